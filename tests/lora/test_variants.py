"""The LoRA family against PEFT on tiny Llama/Gemma 3 models (tied embeddings), random non-zero weights.

For each variant: (a) our saved adapter loaded by ``PeftModel.from_pretrained`` gives our logits,
(b) a PEFT adapter loaded by ``load_adapter`` gives PEFT's logits, (c) ``fuse_lora`` gives the
unmerged logits. Tolerance: atol 1e-5 (rtol 1e-5) on fp32 logits unless a test says otherwise.
"""

from __future__ import annotations

import pytest
import torch

from affinage.lora import fuse_lora, inject_lora, load_adapter, lora_modules, save_adapter
from tests.conftest import tiny_gemma3, tiny_llama

peft = pytest.importorskip("peft")

# name -> (target_modules, affinage options, PEFT LoraConfig options)
VARIANTS = {
    "plain": (["q_proj", "v_proj", "down_proj"], {}, {}),
    "rslora": (["q_proj", "v_proj", "down_proj"], {"use_rslora": True}, {"use_rslora": True}),
    "dora": (["q_proj", "up_proj", "down_proj"], {"use_dora": True}, {"use_dora": True}),
    "patterns": (
        ["q_proj", "v_proj", "down_proj"],
        {"rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"v_proj": 3.0}},
        {"rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"v_proj": 3.0}},
    ),
    "embed_tokens": (["embed_tokens", "q_proj"], {}, {}),
    "lm_head": (["lm_head", "v_proj"], {}, {}),
    "dora_embed_head_rslora": (
        ["embed_tokens", "lm_head", "k_proj"],
        {"use_dora": True, "use_rslora": True},
        {"use_dora": True, "use_rslora": True},
    ),
    "gaussian": (["q_proj", "o_proj"], {"init": "gaussian"}, {"init_lora_weights": "gaussian"}),
    "pissa": (["q_proj", "down_proj"], {"init": "pissa"}, {"init_lora_weights": "pissa"}),
    # PEFT writes PiSSA's residual into the base weight in place, so on a tied head it changes the input
    # embeddings too; affinage gives the head its own residual weight. Hence no (b) for this one.
    "pissa_lm_head": (["lm_head", "o_proj"], {"init": "pissa"}, {"init_lora_weights": "pissa"}),
    "pissa_dora_rslora": (
        ["v_proj", "gate_proj"],
        {"init": "pissa", "use_dora": True, "use_rslora": True},
        {"init_lora_weights": "pissa", "use_dora": True, "use_rslora": True},
    ),
}
BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
CASES = [(v, b) for v in VARIANTS for b in BUILDERS]
IDS = [f"{v}-{b}" for v, b in CASES]
CASES_B = [(v, b) for v, b in CASES if v != "pissa_lm_head"]


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA weights: factors perturbed, DoRA magnitudes rescaled (PiSSA's A0/B0 buffers kept)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "magnitude" in name:
                param.mul_(1 + 0.2 * noise)
            else:
                param.add_(0.1 * noise)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids(tokenizer):
    return torch.tensor([tokenizer("Facture en retard, merci pour la relance")["input_ids"]])


def _ours(variant: str, build, vocab: int) -> torch.nn.Module:
    targets, options, _ = VARIANTS[variant]
    model = build(vocab)
    torch.manual_seed(0)
    inject_lora(model, targets, r=4, alpha=8, dropout=0.0, **options)
    randomise(model)
    return model.eval()


@pytest.mark.parametrize("variant, arch", CASES, ids=IDS)
def test_a_peft_loads_our_adapter(variant, arch, tmp_path, tokenizer, ids):
    build = BUILDERS[arch]
    ours = _ours(variant, build, len(tokenizer))
    save_adapter(ours, tmp_path / "adapter", "tiny")
    theirs = peft.PeftModel.from_pretrained(build(len(tokenizer)), tmp_path / "adapter").eval()
    # atol 1e-5; PiSSA adds the residual's rounding (W - sB0A0 + sBA vs W + s[B,-B0][A;A0]): still within 1e-5
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, arch", CASES_B, ids=[f"{v}-{b}" for v, b in CASES_B])
def test_b_we_load_a_peft_adapter(variant, arch, tmp_path, tokenizer, ids):
    build = BUILDERS[arch]
    targets, _, options = VARIANTS[variant]
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **{"init_lora_weights": False, **options})
    theirs = peft.get_peft_model(build(len(tokenizer)), config)
    randomise(theirs, seed=5)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")  # with embed_tokens/lm_head PEFT also saves their base weights
    ours = load_adapter(build(len(tokenizer)).eval(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, arch", CASES, ids=IDS)
def test_c_fuse_gives_the_unmerged_logits(variant, arch, tokenizer, ids, tmp_path):
    ours = _ours(variant, BUILDERS[arch], len(tokenizer))
    before = logits(ours, ids)
    fuse_lora(ours)
    assert not lora_modules(ours)
    torch.testing.assert_close(logits(ours, ids), before, rtol=1e-5, atol=1e-5)
    # the fused model is a plain transformers model: save, reload, same logits (ties undone where needed)
    ours.save_pretrained(tmp_path / "fused")
    reloaded = type(ours).from_pretrained(tmp_path / "fused").eval()
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
@pytest.mark.parametrize("arch", BUILDERS)
def test_adapting_one_side_of_tied_embeddings_leaves_the_other(target, arch, tokenizer, ids):
    model = BUILDERS[arch](len(tokenizer))
    assert (
        model.config.tie_word_embeddings and model.get_input_embeddings().weight is model.get_output_embeddings().weight
    )
    original = model.get_input_embeddings().weight.detach().clone()
    inject_lora(model, [target], r=4, alpha=8, dropout=0.0)
    randomise(model)
    fuse_lora(model)
    inputs, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inputs is not head and model.config.tie_word_embeddings is False
    untouched = head if target == "embed_tokens" else inputs
    torch.testing.assert_close(untouched, original, rtol=0, atol=0)
    assert not torch.equal(inputs if target == "embed_tokens" else head, original)


def test_untargeted_tied_embeddings_stay_tied(tokenizer):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0)
    fuse_lora(model)
    assert (
        model.config.tie_word_embeddings and model.get_input_embeddings().weight is model.get_output_embeddings().weight
    )


def test_default_infixes_in_peft_keys_load(tmp_path, tokenizer, ids):
    """Adapters written with the adapter name in their keys (``lora_A.default.weight``...) load the same."""
    from safetensors.torch import load_file, save_file

    ours = _ours("dora_embed_head_rslora", tiny_llama, len(tokenizer))
    save_adapter(ours, tmp_path / "a", "tiny")
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    renamed = {}
    for key, value in state.items():
        key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        for suffix in ("lora_embedding_A", "lora_embedding_B"):
            key = key.replace(f".{suffix}", f".{suffix}.default")
        renamed[key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")] = value
    save_file(renamed, str(tmp_path / "a" / "adapter_model.safetensors"))
    loaded = load_adapter(tiny_llama(len(tokenizer)).eval(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
