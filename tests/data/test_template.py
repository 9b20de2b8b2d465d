import pytest

from affinage.data.formats import Example
from affinage.data.template import encode_example, encode_prompt, render_prompt
from affinage.errors import DataError
from affinage.runner import to_example


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
    inference_example = to_example({"prompt": row["prompt"]})
    assert encode_prompt(tokenizer, train_example) == encode_prompt(tokenizer, inference_example)
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
