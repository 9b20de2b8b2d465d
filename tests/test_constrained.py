"""Constrained decoding (issue 16): on a random model, whose free output is garbage, every
regex-constrained answer fully matches and every JSON-schema-constrained answer parses and
validates, greedy or sampled, in left-padded batches, for byte-level and sentencepiece-style
vocabularies, through ``generate``, ``predict`` and a Ludwig-spelled config.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from affinage.config import config_from_dict
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.errors import ConfigError
from affinage.evaluate import generate
from affinage.evaluate.constrain import Constraint, compile_constraint, token_bytes
from tests.conftest import CORPUS, tiny_llama, trained_router

# Prompts of different lengths: the batch is left-padded.
PROMPTS = [
    "Facture 42",
    "Le logiciel se bloque au démarrage depuis la dernière mise à jour, que faire ?",
    "Candidature",
    "Nous serions intéressés par une commande en gros de vos produits.",
    "Mon imprimante ne marche plus 🖨️",
    "Relance de paiement",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "department": {"type": "string", "enum": ["RH", "Support", "Finance"]},
        "priority": {"type": "integer"},
        "summary": {"type": "string"},
    },
    "required": ["department", "priority", "summary"],
    "additionalProperties": False,
}


def examples() -> list[Example]:
    return [Example(prompt=p, completion="") for p in PROMPTS]


def assert_valid(text: str, schema: dict = SCHEMA) -> None:
    """The answer parses and fits SCHEMA (jsonschema when installed, else the same checks by hand)."""
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value, dict) and set(value) == set(schema["required"]), text
        assert value["department"] in ("RH", "Support", "Finance"), text
        assert isinstance(value["priority"], int) and not isinstance(value["priority"], bool), text
        assert isinstance(value["summary"], str), text
    else:
        jsonschema.validate(value, schema)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pattern", ["(RH|Support|Finance)", "[0-9]{3}-[A-Z]{2}", "(oui|non)( [0-9]+)?"])
def test_every_regex_constrained_answer_matches(model, tokenizer, pattern, temperature):
    torch.manual_seed(0)
    free = generate(model, tokenizer, examples(), Prompting(), max_new_tokens=12, temperature=temperature)
    assert not all(re.fullmatch(pattern, text) for text in free)  # the random model alone does not comply
    outputs = generate(
        model,
        tokenizer,
        examples(),
        Prompting(),
        max_new_tokens=12,
        temperature=temperature,
        batch_size=4,  # two batches of different widths
        constraint=Constraint.from_regex(pattern),
    )
    assert len(outputs) == len(PROMPTS)
    assert all(re.fullmatch(pattern, text) for text in outputs), outputs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("max_new_tokens", [40, 64])
def test_every_json_schema_constrained_answer_parses_and_validates(model, tokenizer, temperature, max_new_tokens):
    """An unbounded summary string still closes: the last tokens are kept for the closing quote and brace."""
    torch.manual_seed(1)
    constraint = Constraint.from_json_schema(SCHEMA)
    outputs = generate(
        model,
        tokenizer,
        examples(),
        Prompting(),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        constraint=constraint,
    )
    for text in outputs:
        assert_valid(text)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_new_tokens + 1


def test_a_budget_too_small_for_any_match_is_a_config_error(model, tokenizer):
    constraint = Constraint.from_json_schema(SCHEMA)
    needed = compile_constraint(constraint, tokenizer).min_tokens()
    assert 5 < needed < 40
    with pytest.raises(ConfigError, match=f"at least {needed} new tokens"):
        generate(model, tokenizer, examples()[:1], Prompting(), max_new_tokens=needed - 1, constraint=constraint)
    (text,) = generate(model, tokenizer, examples()[:1], Prompting(), max_new_tokens=needed, constraint=constraint)
    assert_valid(text)


def test_byte_level_token_bytes_decode_like_the_tokenizer(tokenizer):
    vocabulary = token_bytes(tokenizer)
    ids = {index for indices in vocabulary.values() for index in indices}
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids  # a special added token is never generated
    for data, indices in vocabulary.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character
        assert tokenizer.decode(indices, clean_up_tokenization_spaces=False) == text * len(indices)


def sentencepiece_style_tokenizer():
    """A BPE with '▁' for spaces and <0xNN> byte fallback, decoded like Gemma's and Llama 2's tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"])
    )
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_sentencepiece_style_vocabulary_spaces_and_byte_fallback():
    tokenizer = sentencepiece_style_tokenizer()
    vocabulary = token_bytes(tokenizer)
    assert vocabulary[b"\xf0"] == [tokenizer.convert_tokens_to_ids("<0xF0>")]
    spaced = [data for data in vocabulary if data.startswith(b" ") and len(data) > 1]
    assert spaced and not any(b"\xe2\x96\x81" in data for data in vocabulary)  # '▁' became a space
    model = tiny_llama(len(tokenizer), seed=5)
    for pattern in ["(RH|Support|Finance)", "[0-9]{3}-[A-Z]{2}", "Réponse : (oui|non) ✓"]:
        outputs = generate(
            model,
            tokenizer,
            examples(),
            Prompting(),
            max_new_tokens=16,
            temperature=1.0,
            constraint=Constraint.from_regex(pattern),
        )
        assert all(re.fullmatch(pattern, text) for text in outputs), outputs
    for text in generate(
        model, tokenizer, examples()[:3], Prompting(), max_new_tokens=48, constraint=Constraint.from_json_schema(SCHEMA)
    ):
        assert_valid(text)


# Ludwig's spellings: the text_parser form of examples/llm_structured_output, and match_strategy.
LUDWIG_DECODERS = [
    ({"type": "text_parser", "regex": "(RH|Support|Finance)"}, {"regex": "(RH|Support|Finance)"}),
    ({"type": "text_parser", "json_schema": SCHEMA}, {"json_schema": SCHEMA}),
    ({"type": "text_extractor", "match_strategy": "regex", "regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"type": "text_extractor", "match_strategy": "contains", "max_new_tokens": 8}, None),
]


@pytest.mark.parametrize(("decoder", "expected"), LUDWIG_DECODERS)
def test_ludwig_decoder_keys_become_the_generation_constraint(decoder, expected):
    config = config_from_dict(
        {"output_features": [{"name": "label", "type": "text", "decoder": decoder}], "data": {"dataset": "x.jsonl"}}
    )
    got = config.generation.constraint
    assert (got.model_dump(exclude_none=True) if got else None) == expected
    assert config.output_features[0].name == "label"


@pytest.mark.parametrize(
    ("decoder", "message"),
    [
        ({"type": "text_parser", "grammar": "root ::= 'a'"}, "EBNF grammar"),
        ({"type": "text_extractor", "match_strategy": "json_schema", "regex": "a"}, "does not name the pattern"),
        ({"type": "text_parser", "regex": "a", "json_schema": SCHEMA}, "more than one decoding constraint"),
        ({"type": "text_parser", "regex": "(unclosed"}, "not a regular expression"),
        ({"type": "text_parser", "regexp": "a"}, "unknown decoder key"),
    ],
)
def test_ludwig_decoder_mistakes_are_named(decoder, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"output_features": [{"name": "label", "type": "text", "decoder": decoder}]})


def test_json_schema_file_is_read_when_the_config_loads(tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    config = config_from_dict({"generation": {"constraint": {"json_schema": "schema.json"}}}, base_dir=tmp_path)
    assert config.generation.constraint.json_schema == SCHEMA
    with pytest.raises(ConfigError, match="no such file"):
        config_from_dict({"generation": {"constraint": {"json_schema": "missing.json"}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"generation": {"constraint": {}}})


def test_ludwig_config_end_to_end_through_predict(tmp_path, model_dir, capsys):
    """A run trained from a Ludwig-spelled decoder answers within it; --json-schema replaces it for one call."""
    from affinage.cli import main
    from affinage.runner import BasicModelRunner

    run = trained_router(
        tmp_path,
        model_dir,
        "--no-base-eval",
        output_features=[
            {"name": "completion", "type": "text", "decoder": {"type": "text_parser", "regex": "(RH|Support|Finance)"}}
        ],
        trainer={"max_steps": 2, "eval_every": 2},
        generation={"max_new_tokens": 8, "temperature": 1.0},
    )
    runner = BasicModelRunner(run, device="cpu")
    assert all(re.fullmatch("(RH|Support|Finance)", out) for out in runner.predict_many(PROMPTS))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    capsys.readouterr()
    assert main(["predict", str(run), "Facture 42", "--json-schema", str(tmp_path / "schema.json"),
                 "--max-new-tokens", "48", "--json"]) == 0  # fmt: skip
    assert_valid(json.loads(capsys.readouterr().out)["output"])
    assert main(["predict", str(model_dir), "Facture 42", "--regex", "[0-9]{3}-[A-Z]{2}"]) == 0  # a bare base model
    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", capsys.readouterr().out.strip())
    assert main(["predict", str(model_dir), "x", "--regex", "a", "--json-schema", "s.json"]) == 2
    assert "exactly one" in capsys.readouterr().err


@pytest.mark.parametrize(("pattern", "reason"), [("(?=a)b", "look-around"), (r"(a)\1", "back-references")])
def test_a_regex_the_engine_cannot_run_is_refused_when_the_config_loads(pattern, reason):
    with pytest.raises(ConfigError, match=f"generation.constraint.regex.*{reason}"):
        config_from_dict({"generation": {"constraint": {"regex": pattern}}})
    assert config_from_dict({"generation": {"constraint": {"regex": r"\p{L}+"}}}).generation.constraint.regex


def test_evaluation_generates_within_the_configs_constraint(model, tokenizer):
    """The generation task of a run whose config sets a constraint: every evaluated answer complies."""
    from affinage.evaluate.task import evaluate_examples

    config = config_from_dict(
        {
            "generation": {"constraint": {"regex": "[0-9]{3}-[A-Z]{2}"}},
            "eval": {"task": "generation", "max_new_tokens": 10},
        }
    )
    rows = [Example(prompt=p, completion="123-AB") for p in PROMPTS]
    metrics = evaluate_examples(model, tokenizer, rows, {"task": "generation"}, config, Prompting(), with_loss=False)
    assert metrics["method"] == "generation constrained by a regex"
    assert all(re.fullmatch("[0-9]{3}-[A-Z]{2}", p["output"]) for p in metrics["predictions"]), metrics["predictions"]


def test_nucleus_sampling_keeps_to_the_constraint(model, tokenizer):
    """The mask comes before temperature and top-p: the nucleus is drawn from allowed tokens only."""
    torch.manual_seed(2)
    outputs = generate(
        model, tokenizer, examples(), Prompting(), max_new_tokens=40, temperature=1.5, top_p=0.5,
        constraint=Constraint.from_json_schema(SCHEMA),
    )  # fmt: skip
    for text in outputs:
        assert_valid(text)


LUDWIG_SENTIMENT = """
model_type: llm
base_model: Qwen/Qwen2-0.5B-Instruct
prompt:
  task: >
    Classify the sentiment of the following text.
    Respond with exactly one word: positive, negative, or neutral.
input_features:
  - name: text
    type: text
output_features:
  - name: sentiment
    type: text
    decoder:
      type: text_parser
      regex: "(positive|negative|neutral)"
generation:
  max_new_tokens: 10
  temperature: 0.0
  do_sample: false
backend:
  type: local
"""


def test_ludwigs_structured_output_example_loads_as_written():
    """Ludwig's examples/llm_structured_output/config_constrained.yaml, key for key."""
    import yaml

    config = config_from_dict(yaml.safe_load(LUDWIG_SENTIMENT))
    assert config.generation.constraint.regex == "(positive|negative|neutral)"
    assert (config.generation.max_new_tokens, config.generation.temperature) == (10, 0.0)
    assert config.output_features[0].name == "sentiment"
