"""Every named template's Jinja twin (what exports ship) renders exactly what training renders.

Exports (merged directories, GGUF ``tokenizer.chat_template``, the Ollama TEMPLATE derived from
it) carry :data:`affinage.export.chat_template.NAMED_JINJA`; training renders with
:data:`affinage.data.template.NAMED_TEMPLATES`. Any difference means an exported model is
prompted differently from how it was trained. The Jinja side is rendered by transformers' own
chat-template renderer (``apply_chat_template(..., tokenize=False)``), never by affinage.

No model is loaded: this is the fast check for all six templates; the slow end-to-end check in
tests/test_cli.py (``test_merged_chat_template_renders_what_the_run_trained_on``) trains and
merges for alpaca, chatml and the model's own template.
"""

from __future__ import annotations

import copy

import jinja2
import pytest

from affinage.data.formats import Example, alpaca_prompt, row_to_example
from affinage.data.template import (
    ALPACA,
    ALPACA_WITH_INPUT,
    NAMED_TEMPLATES,
    adds_special_tokens,
    encode_prompt,
    render_prompt,
    tokenizer_adds,
)
from affinage.errors import DataError
from affinage.export.chat_template import NAMED_JINJA, run_chat_template

NAMES = sorted(NAMED_TEMPLATES)
CHAT_NAMES = [name for name in NAMES if name != "alpaca"]  # alpaca holds one instruction: no conversations
SYSTEM = "Tu es le routeur d'emails : réponds « RH », « Support », « Finance » ou « SPAM »."
PROMPTS = [
    "Candidature spontanée pour un stage",
    'Résume : « Le café coûte 3 € », d\'après "Le Monde".\nDeuxième ligne avec {{ accolades }} et {% bloc %}.',
    "  Espaces autour, et une fin de ligne\n",  # llama2/llama3 trim contents, the others keep them
    "[INST] déjà formaté [/INST] </s><s> <|im_end|>",
]
HISTORIES = [
    [
        {"role": "user", "content": "Relance de paiement"},
        {"role": "assistant", "content": "Finance, service compta"},
        {"role": "user", "content": "Candidature spontanée"},
    ],
    [
        {"role": "user", "content": " Erreur sur la facture 42\n"},
        {"role": "assistant", "content": "  Finance "},
        {"role": "user", "content": "Et celle-ci ?"},
        {"role": "assistant", "content": "Support"},
        {"role": "user", "content": "Gagnez un iPhone 🙂"},
    ],
]


def _jinja(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
    """transformers' rendering of ``template``, as any tool using the exported tokenizer gets it."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer, but adding a BOS like Gemma's and Llama's: alpaca/chatml/phi3 exports write it."""
    from tokenizers.processors import TemplateProcessing

    adding = copy.deepcopy(tokenizer)
    bos = adding.bos_token
    adding.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, adding.bos_token_id)]
    )
    assert tokenizer_adds(adding, adding.bos_token_id) and not tokenizer_adds(tokenizer, tokenizer.bos_token_id)
    return adding


@pytest.fixture(params=["plain", "adds-bos"])
def any_tokenizer(request, tokenizer, bos_tokenizer):
    return tokenizer if request.param == "plain" else bos_tokenizer


def _exported(tokenizer, name: str, system: str | None) -> str:
    template, _, exact = run_chat_template(tokenizer, name, system)
    assert exact and template is not None
    return template


def _bos(tokenizer, name: str) -> str:
    """The BOS the tokenizer puts before a named template's text in training (the export writes it)."""
    adds = adds_special_tokens(tokenizer, name) and tokenizer_adds(tokenizer, tokenizer.bos_token_id)
    return tokenizer.bos_token if adds else ""


def _assert_same(tokenizer, name: str, system: str | None, example: Example, messages: list[dict[str, str]]) -> None:
    """Same text, and the same token ids training encodes (a chat template's text gets no special tokens)."""
    exported = _exported(tokenizer, name, system)
    theirs = _jinja(tokenizer, exported, messages)
    ours = render_prompt(tokenizer, example, name, system)
    assert theirs == _bos(tokenizer, name) + ours
    assert tokenizer(theirs, add_special_tokens=False)["input_ids"] == encode_prompt(tokenizer, example, name, system)


def test_every_named_template_has_a_jinja_twin():
    assert set(NAMED_JINJA) == set(NAMED_TEMPLATES)


# The config refuses prompt.system with alpaca (its preamble is fixed): no such case to check.
CASES = [(name, system) for name in NAMES for system in (None, SYSTEM) if not (name == "alpaca" and system)]


@pytest.mark.parametrize("name, system", CASES)
def test_single_turn_prompts_are_the_same(any_tokenizer, name, system):
    for prompt in PROMPTS:
        example = Example(prompt=prompt, completion="RH")
        _assert_same(any_tokenizer, name, system, example, [{"role": "user", "content": prompt}])


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_a_system_message_in_the_conversation_is_rendered_the_same(any_tokenizer, name):
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        example = Example(prompt=None, completion="RH", messages=messages)
        _assert_same(any_tokenizer, name, None, example, messages)
        # the conversation's own system message wins over the run's default, on both sides
        _assert_same(any_tokenizer, name, "Autre consigne.", example, messages)


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("name", CHAT_NAMES)
def test_multi_turn_conversations_are_the_same(any_tokenizer, name, system):
    """The prompt of a conversation (earlier answers included, as training encodes them) and the closed
    conversation (what training renders to find each earlier answer's end-of-turn)."""
    for history in HISTORIES:
        for messages in (history, [{"role": "system", "content": "Réponds en un mot."}] + history):
            example = Example(prompt=None, completion="RH", messages=messages)
            _assert_same(any_tokenizer, name, system, example, messages)
            closed = messages + [{"role": "assistant", "content": "RH"}]
            if system is not None and closed[0]["role"] != "system":
                ours = NAMED_TEMPLATES[name]([{"role": "system", "content": system}] + closed, False)
            else:
                ours = NAMED_TEMPLATES[name](closed, False)
            theirs = _jinja(any_tokenizer, _exported(any_tokenizer, name, system), closed, False)
            assert theirs == _bos(any_tokenizer, name) + ours


@pytest.mark.parametrize("name", ["llama2", "mistral"])
def test_turns_that_do_not_alternate_are_refused_on_both_sides(tokenizer, name):
    for messages in (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
    ):
        with pytest.raises(DataError, match="alternate"):
            render_prompt(tokenizer, Example(prompt=None, completion="x", messages=messages), name)
        with pytest.raises(jinja2.TemplateError, match="alternate"):
            _jinja(tokenizer, NAMED_JINJA[name], messages)


@pytest.mark.parametrize("row_input", [None, "", "   "], ids=["no-input", "empty-input", "blank-input"])
def test_alpaca_instruction_rows_are_the_same(any_tokenizer, row_input):
    row = {"instruction": "Classe cet email : « Facture 42 impayée »", "output": "Finance"}
    if row_input is not None:
        row["input"] = row_input
    example = row_to_example(row, "t:1", input_field=None, output_field=None, templated=False)
    _assert_same(any_tokenizer, "alpaca", None, example, [{"role": "user", "content": row["instruction"]}])
    # the whole text training encodes: prompt, answer, EOS
    closed = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": "Finance"}]
    exported = _exported(any_tokenizer, "alpaca", None)
    prompt = render_prompt(any_tokenizer, example, "alpaca")
    expected = _bos(any_tokenizer, "alpaca") + prompt + "Finance" + any_tokenizer.eos_token
    assert _jinja(any_tokenizer, exported, closed, False) == expected


def test_alpaca_rows_with_an_input_have_no_chat_form(tokenizer):
    """Training renders instruction+input with ALPACA_WITH_INPUT; a chat client sends one user message,
    ``instruction\\n\\ninput``, which the exported template renders with the instruction-only prompt."""
    row = {"instruction": "Résume ce texte", "input": "Le café coûte 3 €.", "output": "Café cher."}
    example = row_to_example(row, "t:1", input_field=None, output_field=None, templated=False)
    trained = render_prompt(tokenizer, example, "alpaca")
    assert trained == ALPACA_WITH_INPUT.format_map(row)
    sent = alpaca_prompt(row["instruction"], row["input"])
    assert sent == example.prompt == "Résume ce texte\n\nLe café coûte 3 €."
    chat = _jinja(tokenizer, _exported(tokenizer, "alpaca", None), [{"role": "user", "content": sent}])
    assert chat == ALPACA.format_map({"instruction": sent}) != trained
