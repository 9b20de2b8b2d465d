"""GGUF files as llama.cpp reads them: logits of tiny Llama / Gemma 3 models in llama.cpp vs PyTorch."""

import json

import llama_cpp  # the consumer under test: installed by ./run.sh (affinage[export]), never skipped
import numpy as np
import pytest
import torch

from affinage.errors import AffinageError
from affinage.export.gguf_lora import write_adapter_gguf
from affinage.export.gguf_model import rotary_interleave
from affinage.export.gguf_vocab import gguf_vocab, pre_tokenizer_name
from affinage.export.gguf_write import check_quant, tensor_type, write_model_gguf
from affinage.lora import inject_lora, lora_modules, save_adapter
from tests.conftest import tiny_gemma3, tiny_llama

TEXT = "Bonjour, je souhaiterais savoir où en est ma candidature pour le poste de développeur. J'ai un problème"


def build(arch: str, vocab: int, **overrides):
    if arch == "gemma3":  # llama.cpp scales queries by 1/sqrt(head_dim): the tiny config must agree
        return tiny_gemma3(vocab, query_pre_attn_scalar=16, **overrides)
    return tiny_llama(vocab, **overrides)


def save_model_dir(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_cpp_logits(path, ids, lora=None):
    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=256,
        verbose=False,
        n_threads=2,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("quant, tolerance", [("f32", 2e-3), ("f16", 1e-2), ("q8_0", 5e-2)])
def test_gguf_logits_match_pytorch(tmp_path, tokenizer, arch, quant, tolerance):
    model = build(arch, len(tokenizer))
    directory = save_model_dir(model, tokenizer, tmp_path / "model")
    write_model_gguf(
        tmp_path / "model.gguf", model, gguf_vocab(tokenizer, directory, model.config.vocab_size), quant=quant
    )
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 16  # past Gemma 3's sliding window of the tiny config
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(tmp_path / "model.gguf", ids)
    assert np.abs(got - expected).max() < tolerance * max(1.0, np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_the_rotary_interleave_is_what_llama_cpp_needs(tmp_path, tokenizer):
    """Without it the Llama export is wrong: the same file with q/k left in Hugging Face's order disagrees."""
    weight = torch.arange(8.0).repeat_interleave(3).reshape(8, 3)  # 1 head of 8 rows: halves [0..3], [4..7]
    assert rotary_interleave(weight, heads=1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(rotary_interleave(weight, heads=2)[:4], rotary_interleave(weight[:4], heads=1))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_gguf_applies_like_the_pytorch_adapter(tmp_path, tokenizer, arch, rslora):
    base = build(arch, len(tokenizer))
    directory = save_model_dir(base, tokenizer, tmp_path / "model")
    write_model_gguf(
        tmp_path / "base.gguf", base, gguf_vocab(tokenizer, directory, base.config.vocab_size), quant="f32"
    )
    adapted = build(arch, len(tokenizer))
    inject_lora(adapted, "all-linear", r=4, alpha=8, dropout=0.0, use_rslora=rslora)
    for module in lora_modules(adapted).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    save_adapter(adapted, tmp_path / "adapter", str(directory))
    info = write_adapter_gguf(tmp_path / "adapter.gguf", tmp_path / "adapter", base.config)
    assert info["alpha"] == pytest.approx(8 * 2 if rslora else 8)  # rsLoRA: alpha*sqrt(r), r=4
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected, plain = (m(torch.tensor([ids])).logits[0].numpy() for m in (adapted.eval(), base))
    assert np.abs(expected - plain).max() > 0.05  # the adapter changes the answer
    got = llama_cpp_logits(tmp_path / "base.gguf", ids, lora=tmp_path / "adapter.gguf")
    assert np.abs(got - expected).max() < 2e-3 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"alpha_pattern": {"model.layers.0.self_attn.q_proj": 3}}, "alpha_pattern"),
    ],
)
def test_lora_adapter_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path, tokenizer, change, message):
    model = build("llama", len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    save_adapter(model, tmp_path / "adapter", "tiny")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(AffinageError, match=message) as error:
        write_adapter_gguf(tmp_path / "adapter.gguf", tmp_path / "adapter", model.config)
    assert "--format gguf" in str(error.value)
    assert not (tmp_path / "adapter.gguf").exists()


def test_lora_on_embeddings_is_refused_for_llama_cpp(tmp_path, tokenizer):
    model = build("llama", len(tokenizer))
    inject_lora(model, ["embed_tokens", "q_proj"], r=4, alpha=8, dropout=0.0)
    save_adapter(model, tmp_path / "adapter", "tiny")
    with pytest.raises(AffinageError, match="embeddings"):
        write_adapter_gguf(tmp_path / "adapter.gguf", tmp_path / "adapter", model.config)


def test_quantization_choices_name_the_k_quant_tool():
    with pytest.raises(AffinageError, match="llama-quantize"):
        check_quant("q4_k_m")
    matrix, norm = np.zeros((8, 64), np.float32), np.zeros(64, np.float32)
    assert tensor_type("blk.0.attn_q.weight", matrix, "q4_0").name == "Q4_0"
    assert tensor_type("token_embd.weight", matrix, "q4_0").name == "Q8_0"  # sets every logit: kept at 8 bits
    assert tensor_type("blk.0.attn_norm.weight", norm, "q8_0").name == "F32"
    assert tensor_type("blk.0.ffn_down.weight", np.zeros((8, 48), np.float32), "q8_0").name == "F16"  # 48 % 32


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    with pytest.raises(AffinageError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
