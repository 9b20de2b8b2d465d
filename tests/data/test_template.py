import pytest

from affinage.config import config_from_dict
from affinage.data.formats import Example, row_to_example
from affinage.data.inference import inference_example
from affinage.data.template import encode_example, encode_prompt, render_prompt
from affinage.errors import ConfigError, DataError


def test_loss_only_on_completion_and_ends_with_eos(tokenizer):
    example = Example(prompt="Facture en retard", completion="Finance")
    encoded = encode_example(tokenizer, example, max_len=256)
    prompt_ids = encode_prompt(tokenizer, example)
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == -100 for label in encoded.labels[: len(prompt_ids)])
    trained = [t for t in encoded.labels if t != -100]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]) == "Finance"


def test_training_and_inference_render_the_same_prompt(tokenizer):
    row = {"prompt": "Candidature spontanée", "completion": "RH"}
    train_example = Example(prompt=row["prompt"], completion="RH", row=row)
    inferred = inference_example({"prompt": row["prompt"]})
    assert encode_prompt(tokenizer, train_example) == encode_prompt(tokenizer, inferred)
    assert render_prompt(tokenizer, train_example).endswith("<|im_start|>assistant\n")


def test_literal_template_and_missing_placeholder(tokenizer):
    template = "### Instruction:\n{instruction}\n### Response:\n"
    example = Example(prompt=None, completion="x", row={"instruction": "Say hi", "output": "x"})
    assert render_prompt(tokenizer, example, template) == "### Instruction:\nSay hi\n### Response:\n"
    with pytest.raises(DataError, match=r"\{context\}"):
        render_prompt(tokenizer, example, "{context}")


def test_truncation_keeps_the_completion_and_is_reported(tokenizer):
    example = Example(prompt="mot " * 400, completion="SPAM")
    encoded = encode_example(tokenizer, example, max_len=64)
    assert encoded.truncated and len(encoded.input_ids) == 64
    assert encoded.labels[-1] == tokenizer.eos_token_id
    assert encoded.input_ids[-3:] == encoded.labels[-3:]


def test_system_message_is_rendered(tokenizer):
    text = render_prompt(tokenizer, Example(prompt="hi", completion=""), system="Route emails.")
    assert text.startswith("<|im_start|>system\nRoute emails.<|im_end|>")


# --- plain text, multi-turn chat, named templates ---------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Route les emails."},
    {"role": "user", "content": "Relance de paiement"},
    {"role": "assistant", "content": "Finance, service compta"},
    {"role": "user", "content": "Candidature spontanée"},
    {"role": "assistant", "content": "RH"},
]


def _chat(messages):
    return row_to_example({"messages": messages}, "d.jsonl:1", input_field=None, output_field=None, templated=False)


def _labelled_runs(tokenizer, encoded):
    """Each run of consecutive labelled tokens, decoded with its special tokens."""
    assert all(label in (-100, token) for label, token in zip(encoded.labels, encoded.input_ids))
    runs, current = [], []
    for label in encoded.labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer, bos_tokenizer):
    example = Example(prompt="", completion="Le service RH traite les candidatures.", kind="text")
    encoded = encode_example(tokenizer, example, max_len=256, template="chatml", system="ignored")
    assert encoded.labels == encoded.input_ids and not encoded.truncated
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.input_ids) == "Le service RH traite les candidatures.<|im_end|>"  # no template
    with_bos = encode_example(bos_tokenizer, example, max_len=256)
    assert (
        with_bos.input_ids == [bos_tokenizer.bos_token_id] + encoded.input_ids and with_bos.labels == with_bos.input_ids
    )
    cut = encode_example(tokenizer, example, max_len=5)
    assert cut.truncated and cut.input_ids == encoded.input_ids[:5] and cut.labels == cut.input_ids


@pytest.mark.parametrize("template", [None, "chatml"])
def test_multi_turn_trains_on_every_assistant_turn(tokenizer, template):
    example = _chat(CONVERSATION)
    assert example.completion == "RH" and example.messages == CONVERSATION[:-1]  # evaluation's prompt is unchanged
    encoded = encode_example(tokenizer, example, max_len=512, template=template)
    assert _labelled_runs(tokenizer, encoded) == ["Finance, service compta<|im_end|>", "RH<|im_end|>"]
    text = tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text == (
        "<|im_start|>system\nRoute les emails.<|im_end|>\n<|im_start|>user\nRelance de paiement<|im_end|>\n"
        "<|im_start|>assistant\nFinance, service compta<|im_end|>\n<|im_start|>user\nCandidature spontanée<|im_end|>\n"
        "<|im_start|>assistant\nRH<|im_end|>"
    )
    # Same tokens as the prompt the model is asked at evaluation, then the answer + EOS.
    prompt_ids = encode_prompt(tokenizer, example, template)
    assert encoded.input_ids == prompt_ids + tokenizer("RH", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def test_multi_turn_with_other_templates(tokenizer):
    from tests.conftest import _tokenizer

    # Meta's Llama 3 format (its <|eot_id|> is plain text to this tokenizer: the answers alone are labelled).
    encoded = encode_example(tokenizer, _chat(CONVERSATION), 512, "llama3")
    assert _labelled_runs(tokenizer, encoded) == ["Finance, service compta", "RH<|im_end|>"]
    # A template whose prefixes are not prefixes of the whole (Phi-3 writes EOS after a finished conversation).
    eos_at_end = _tokenizer()
    eos_at_end.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
    )
    encoded = encode_example(eos_at_end, _chat(CONVERSATION), 512)
    assert _labelled_runs(eos_at_end, encoded) == ["Finance, service compta<|im_end|>", "RH<|im_end|>"]
    # A template that rewrites past answers cannot be trained on them: said, not silently skipped.
    rewrites = _tokenizer()
    rewrites.chat_template = (
        "{% for m in messages %}{% set c = '...' if m['role'] == 'assistant' and not loop.last else m['content'] %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:1: assistant message 2 is not in the rendered chat template"):
        encode_example(rewrites, _chat(CONVERSATION), 512)


def test_multi_turn_truncation_keeps_the_final_answer(tokenizer):
    messages = [
        {"role": "user", "content": "mot " * 200},
        {"role": "assistant", "content": "Support"},
        {"role": "user", "content": "Facture"},
        {"role": "assistant", "content": "Finance"},
    ]
    encoded = encode_example(tokenizer, _chat(messages), max_len=48)
    assert encoded.truncated and len(encoded.input_ids) == 48
    assert _labelled_runs(tokenizer, encoded)[-1] == "Finance<|im_end|>"


def test_single_turn_chat_encodes_as_before(tokenizer):
    messages = [
        {"role": "system", "content": "Route les emails."},
        {"role": "user", "content": "Facture 42"},
        {"role": "assistant", "content": "Finance"},
    ]
    encoded = encode_example(tokenizer, _chat(messages), max_len=256)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer("Finance", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids == prompt_ids + answer
    assert encoded.labels == [-100] * len(prompt_ids) + answer


NAMED = {
    "chatml": "<|im_start|>system\nRoute les emails.<|im_end|>\n<|im_start|>user\nBonjour<|im_end|>\n"
    "<|im_start|>assistant\n"
    "Salut<|im_end|>\n<|im_start|>user\nFacture 42<|im_end|>\n<|im_start|>assistant\n",
    "phi3": "<|system|>\nRoute les emails.<|end|>\n<|user|>\nBonjour<|end|>\n<|assistant|>\nSalut<|end|>\n"
    "<|user|>\nFacture 42<|end|>\n<|assistant|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nRoute les emails.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBonjour<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Salut<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nFacture 42<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nRoute les emails.\n<</SYS>>\n\nBonjour [/INST] Salut </s>"
    "<s>[INST] Facture 42 [/INST]",
    "mistral": "<s>[INST] Route les emails.\n\nBonjour [/INST] Salut</s>[INST] Facture 42 [/INST]",
}
SINGLE = {
    "chatml": "<|im_start|>user\nFacture 42<|im_end|>\n<|im_start|>assistant\n",
    "phi3": "<|user|>\nFacture 42<|end|>\n<|assistant|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nFacture 42<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] Facture 42 [/INST]",
    "mistral": "<s>[INST] Facture 42 [/INST]",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_chat_templates_render_the_documented_format(tokenizer, name):
    history = [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut"}]
    chat = Example(prompt="Facture 42", completion="Finance", messages=history)
    assert render_prompt(tokenizer, chat, name, system="Route les emails.") == NAMED[name]
    assert render_prompt(tokenizer, Example(prompt="Facture 42", completion="Finance"), name) == SINGLE[name]
    # The same text from a chat row (system in the messages) and from a prompt row with prompt.system.
    row = _chat(
        [
            {"role": "system", "content": "Route les emails."},
            *history,
            {"role": "user", "content": "Facture 42"},
            {"role": "assistant", "content": "Finance"},
        ]
    )
    assert render_prompt(tokenizer, row, name) == NAMED[name]
    assert render_prompt(tokenizer, chat, name.upper(), system="Route les emails.") == NAMED[name]


def test_named_templates_that_write_bos_get_no_second_one(bos_tokenizer):
    example = Example(prompt="Facture 42", completion="Finance")
    bos = bos_tokenizer.bos_token_id
    for name in ("llama2", "llama3", "mistral"):
        ids = encode_prompt(bos_tokenizer, example, name)
        assert ids == bos_tokenizer(SINGLE[name], add_special_tokens=False)["input_ids"] and ids[0] != bos
    for name in ("chatml", "phi3", "alpaca"):
        assert encode_prompt(bos_tokenizer, example, name)[0] == bos


def test_alpaca_with_and_without_input(tokenizer):
    with_input = Example(
        prompt="Classe\n\nFacture 42",
        completion="Finance",
        row={"instruction": "Classe", "input": "Facture 42", "output": "Finance"},
    )
    assert render_prompt(tokenizer, with_input, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClasse\n\n### Input:\nFacture 42\n\n### Response:\n"
    )
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDis bonjour\n\n### Response:\n"
    )
    no_input = Example(
        prompt="Dis bonjour", completion="Bonjour", row={"instruction": "Dis bonjour", "input": "", "output": "Bonjour"}
    )
    assert render_prompt(tokenizer, no_input, "alpaca") == expected
    assert (
        render_prompt(tokenizer, Example(prompt="Dis bonjour", completion="Bonjour"), "alpaca") == expected
    )  # prompt rows
    assert (
        render_prompt(
            tokenizer,
            _chat([{"role": "user", "content": "Dis bonjour"}, {"role": "assistant", "content": "Bonjour"}]),
            "alpaca",
        )
        == expected
    )
    with pytest.raises(DataError, match="alpaca template holds one instruction"):
        encode_example(tokenizer, _chat(CONVERSATION), 256, "alpaca")
    encoded = encode_example(tokenizer, no_input, 256, "alpaca")
    assert tokenizer.decode([t for t in encoded.labels if t != -100]) == "Bonjour<|im_end|>"


def test_unknown_template_name_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match=r"unknown prompt template 'chatm'") as error:
        render_prompt(tokenizer, Example(prompt="x", completion="y"), "chatm")
    assert "alpaca, chatml, llama2, llama3, mistral, phi3" in error.value.fix
    with pytest.raises(
        ConfigError, match=r"prompt\.template.*named templates: alpaca, chatml, llama2, llama3, mistral, phi3"
    ):
        config_from_dict({"prompt": {"template": "llama-3"}})
    with pytest.raises(ConfigError, match="alpaca"):
        config_from_dict({"prompt": {"template": "alpaca", "system": "Sois bref."}})
    assert config_from_dict({"prompt": {"template": "Llama3"}}).prompt.template == "llama3"
    assert config_from_dict({"prompt": {"template": "Q: {question}\nA:"}}).prompt.template == "Q: {question}\nA:"


def test_chat_rows_need_a_chat_template(tokenizer):
    from tests.conftest import _tokenizer

    raw = _tokenizer()
    raw.chat_template = None
    with pytest.raises(DataError, match=r"d\.jsonl:1: a chat row needs a chat template") as error:
        encode_example(raw, _chat(CONVERSATION), 256)
    assert "chatml" in error.value.fix
    assert render_prompt(raw, _chat(CONVERSATION), "chatml").endswith("<|im_start|>assistant\n")
