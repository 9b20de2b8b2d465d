import random

import pytest

from affinage.config import config_from_dict
from affinage.data import load_file
from affinage.data.formats import Example
from affinage.data.transforms import HEARTS, Transform, add_hearts, apply_transforms, strip_accents
from affinage.errors import ConfigError
from affinage.evaluate.patterns import hearts_score


def test_strip_accents_keeps_letters_and_punctuation():
    assert strip_accents("Réunion à l'hôtel, ça dépend — naïve Œuvre") == "Reunion a l'hotel, ca depend — naive Œuvre"


def test_hearts_puts_one_heart_between_every_word():
    text = add_hearts("Virgin Australia commenced services\non 31 August 2000.", random.Random(0))
    words = text.split()
    assert words[0::2] == ["Virgin", "Australia", "commenced", "services", "on", "31", "August", "2000."]
    assert len(set(words[1::2])) == 1 and words[1] in HEARTS
    assert hearts_score(text) == 1.0


def test_hearts_is_reproducible_per_example_and_varies_across_examples():
    transform = Transform("hearts", seed=42)
    answers = [f"answer number {i} is here" for i in range(60)]
    first = [transform.text(a) for a in answers]
    assert first == [transform.text(a) for a in reversed(answers)][::-1]  # order does not matter
    assert len({t.split()[1] for t in first}) >= 5  # the heart varies between examples
    assert {t.split()[1] for t in first} <= set(HEARTS)


def test_sides_prompt_answer_and_messages():
    example = Example(
        prompt="Où est l'été ?",
        completion="Là-bas, déjà.",
        row={"prompt": "Où est l'été ?", "completion": "Là-bas, déjà."},
    )
    answer_only = Transform("hearts").apply(example)
    assert answer_only.prompt == example.prompt and hearts_score(answer_only.completion) == 1.0
    both = Transform("strip_accents").apply(example)
    assert (both.prompt, both.completion, both.row["prompt"]) == ("Ou est l'ete ?", "La-bas, deja.", "Ou est l'ete ?")
    at_inference = Transform("strip_accents").apply(example, prompt_side_only=True)
    assert at_inference.prompt == "Ou est l'ete ?" and at_inference.completion == example.completion
    chat = Example(
        prompt=None,
        completion="Très bien",
        messages=[{"role": "user", "content": "Ça va ?"}, {"role": "assistant", "content": "Oui merci"}],
    )
    hearted = Transform("hearts").apply(chat)
    assert hearted.messages[0]["content"] == "Ça va ?" and hearts_score(hearted.messages[1]["content"]) == 1.0


def test_user_function_next_to_the_config(tmp_path):
    (tmp_path / "my_transforms.py").write_text("def shout(text):\n    return text.upper()\n")
    (tmp_path / "data.jsonl").write_text('{"prompt": "bonjour", "completion": "salut"}\n')
    config = config_from_dict(
        {
            "data": {
                "dataset": "data.jsonl",
                "transforms": ["strip_accents", {"name": "my_transforms.shout", "side": "both"}],
            }
        },
        base_dir=tmp_path,
    )
    [example] = load_file(config, tmp_path / "data.jsonl")
    assert (example.prompt, example.completion) == ("BONJOUR", "SALUT")


def test_unknown_transform_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a built-in"):
        Transform("sparkles")
    with pytest.raises(ConfigError, match="cannot import"):
        Transform("no_such_module.fn", base_dir=str(tmp_path))


def test_apply_transforms_in_order():
    examples = [Example(prompt="é", completion="un deux trois")]
    [result] = apply_transforms(examples, [Transform("strip_accents"), Transform("hearts")])
    assert result.prompt == "e" and hearts_score(result.completion) == 1.0


def test_installed_callables_are_never_loaded(tmp_path):
    """A shared config or run must not be able to name os.system or builtins.exec."""
    from affinage.evaluate.patterns import resolve_checker

    for name in ("os.system", "subprocess.call", "builtins.exec"):
        with pytest.raises(ConfigError, match="installed modules are not loaded"):
            Transform(name, base_dir=str(tmp_path))
        with pytest.raises(ConfigError):
            resolve_checker(name, str(tmp_path))


def test_user_function_taking_text_and_rng(tmp_path):
    (tmp_path / "noisy.py").write_text("def pick(text, rng):\n    return text + ' ' + str(rng.randint(0, 9))\n")
    transform = Transform("noisy.pick", base_dir=str(tmp_path))
    assert transform.text("a") == transform.text("a") and transform.text("a")[:2] == "a "
