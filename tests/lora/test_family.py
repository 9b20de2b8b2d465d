"""The LoRA family's own behaviour: rsLoRA scaling, DoRA gradients, inits, patterns, options refused on load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from affinage.config import TrainerConfig, config_from_dict
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.errors import AffinageError, ConfigError
from affinage.lora import LoRAEmbedding, LoRALinear, inject_lora, load_adapter, lora_modules, save_adapter
from affinage.lora.inject import pattern_key, pattern_value
from affinage.training import causal_lm_loss, full_logits_loss, train
from affinage.training.prefix_cache import frozen_boundary
from tests.conftest import EMAILS, tiny_gemma3, tiny_llama
from tests.lora.test_variants import logits, randomise

peft = pytest.importorskip("peft")


@pytest.fixture
def ids(tokenizer):
    return torch.tensor([tokenizer("Relance de paiement, facture 42")["input_ids"]])


def test_e_rslora_scaling_is_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(32, 16), r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16)) == pytest.approx(2.0)
    assert LoRALinear(nn.Linear(32, 16), r=16, alpha=8).scaling == pytest.approx(0.5)
    model = peft.get_peft_model(
        nn.Sequential(nn.Linear(32, 16)), peft.LoraConfig(r=16, lora_alpha=8, target_modules=["0"], use_rslora=True)
    )
    assert model.base_model.model[0].scaling["default"] == pytest.approx(layer.scaling)


def _peft_name(name: str) -> str:
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if "magnitude" in name else name


def test_d_dora_gradients_reach_magnitude_and_factors_as_in_peft(tmp_path, tokenizer, ids):
    """Same loss and gradients as PEFT's DoRA (linear, embedding and head) on the same weights.

    Tolerances: rtol 1e-4, atol 1e-6.
    """
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "lm_head", "q_proj", "down_proj"],
        use_dora=True,
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(len(tokenizer)), config)
    randomise(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(len(tokenizer)), tmp_path / "peft")
    for model in (theirs, ours):
        model.train()
        out = model(ids).logits
        torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:]).backward()
    peft_grads = {_peft_name(n): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    assert set(our_grads) == set(peft_grads)
    assert any("magnitude" in n for n in our_grads) and any("embedding_A" in n for n in our_grads)
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6)


def test_dora_starts_equal_to_the_base_and_magnitude_is_the_row_norm():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, r=3, alpha=6, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.norm(dim=1))
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), base(x))
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    fused = layer.fuse()
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.weight.norm(dim=1), layer.lora_magnitude_vector.detach(), rtol=1e-5, atol=1e-5)


def test_dora_on_a_tied_head_with_a_zero_padding_row_stays_finite(tokenizer, ids):
    model = tiny_llama(len(tokenizer))  # Llama zeroes the padding row of the (tied) table: norm 0 at init
    assert model.lm_head.weight[0].abs().sum() == 0
    before = logits(model, ids)
    inject_lora(model, ["lm_head"], r=2, alpha=4, dropout=0.0, use_dora=True)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)  # not NaN (PEFT gives 0/0 there)


class Linear4bit(nn.Linear):
    """Stands for bitsandbytes' 4-bit layer (recognised by name)."""


@pytest.mark.parametrize("option", [{"use_dora": True}, {"init": "pissa"}])
def test_dora_and_pissa_refuse_a_quantized_base(option):
    model = nn.Sequential()
    model.add_module("q_proj", Linear4bit(8, 8))
    with pytest.raises(ConfigError, match="full-precision"):
        inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0, **option)


def test_gaussian_init_is_peft_s(tokenizer):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 64), r=4, alpha=8, init="gaussian")
    assert layer.lora_B.weight.abs().sum() == 0
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.05)  # PEFT: std 1/r
    with pytest.raises(ConfigError, match="olora"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=2, init="olora")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_pissa_starts_equal_to_the_base_with_the_residual_as_base(build, tokenizer, ids):
    model = build(len(tokenizer))
    before = logits(model, ids)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head_weight = model.lm_head.weight.detach().clone()
    inject_lora(model, ["q_proj", "lm_head"], r=4, alpha=8, dropout=0.0, init="pissa")
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    head = model.lm_head
    assert not torch.allclose(head.base_layer.weight, head_weight)  # the residual
    torch.testing.assert_close(head.base_layer.weight + head.delta_weight(), head_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings, rtol=0, atol=0)  # tied table untouched
    assert model.config.tie_word_embeddings is False


def test_patterns_follow_peft_semantics_and_are_saved_compactly(tmp_path, tokenizer):
    assert pattern_key({"q_proj": 1}, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert (
        pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None
    )  # a whole name component, not a substring
    assert pattern_key({"layers.1.self_attn.q_proj": 1}, "model.layers.1.self_attn.q_proj") is not None
    assert pattern_key({r"layers\.[01]\..*q_proj": 1}, "model.layers.0.self_attn.q_proj") is not None
    model = tiny_llama(len(tokenizer))
    inject_lora(
        model,
        ["q_proj", "down_proj"],
        r=4,
        alpha=8,
        dropout=0.0,
        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"q_proj": 5},
    )
    modules = lora_modules(model)
    assert [modules[f"model.layers.{i}.self_attn.q_proj"].r for i in (0, 1)] == [4, 6]
    assert modules["model.layers.0.mlp.down_proj"].r == 2 and modules["model.layers.0.mlp.down_proj"].alpha == 8
    assert modules["model.layers.1.self_attn.q_proj"].alpha == 5
    save_adapter(model, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for name, module in modules.items():  # PEFT's lookup of the saved patterns gives every module its own rank/alpha
        assert pattern_value(config["rank_pattern"], name, config["r"]) == module.r
        assert pattern_value(config["alpha_pattern"], name, config["lora_alpha"]) == module.alpha
    assert len(config["rank_pattern"]) == 2 and config["alpha_pattern"] in ({"q_proj": 5}, {"down_proj": 8})


def _encoded(tokenizer, n=8):
    examples = [Example(prompt=text, completion=label) for label, texts in EMAILS.items() for text in texts][:n]
    return [encode_example(tokenizer, e, 128) for e in examples]


def test_training_every_variant_then_reloading_the_saved_adapter(tmp_path, tokenizer, ids):
    """The pipeline's path: train, reload the saved adapter into the training model, and into a fresh base."""
    model = tiny_llama(len(tokenizer))
    torch.manual_seed(0)
    inject_lora(
        model,
        ["embed_tokens", "lm_head", "q_proj", "down_proj"],
        r=4,
        alpha=8,
        dropout=0.1,
        use_dora=True,
        use_rslora=True,
        init="pissa",
        rank_pattern={"down_proj": 2},
    )
    cfg = TrainerConfig(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)
    train(
        model,
        _encoded(tokenizer),
        [],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="tiny",
        progress=False,
    )
    model.eval()
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(tiny_llama(len(tokenizer)), ids), atol=1e-3)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["use_dora"] and config["use_rslora"]
    assert (
        pattern_value(config["rank_pattern"], "model.layers.0.self_attn.q_proj", config["r"]) == 8
    )  # PiSSA saved as 2r
    load_adapter(model, tmp_path / "adapter")  # the PiSSA layers take back the first r rows/columns
    torch.testing.assert_close(logits(model, ids), trained, rtol=1e-5, atol=1e-5)
    fresh = load_adapter(tiny_llama(len(tokenizer)).eval(), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, ids), trained, rtol=1e-5, atol=1e-5)


def test_a_wrapped_head_works_in_the_labels_only_loss_and_the_prefix_cache(tokenizer):
    from affinage.data.batching import collate

    model = tiny_gemma3(len(tokenizer))
    inject_lora(model, ["lm_head", "q_proj"], r=4, alpha=8, dropout=0.0)
    randomise(model)
    batch = collate(_encoded(tokenizer, 4), tokenizer.pad_token_id)
    fast, n = causal_lm_loss(model, batch)
    full, m = full_logits_loss(model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    fast.backward()
    assert model.lm_head.lora_A.weight.grad.abs().sum() > 0
    embedded = tiny_llama(len(tokenizer), layers=4)
    inject_lora(embedded, ["embed_tokens", "q_proj"], r=2, alpha=4, dropout=0.0)
    assert isinstance(embedded.get_input_embeddings(), LoRAEmbedding)
    assert frozen_boundary(embedded) is None  # the table trains: nothing below the blocks is constant


def _write_adapter(tmp_path, tokenizer, **changes):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0)
    save_adapter(model, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "option, value",
    [
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "loftq"),
        ("bias", "all"),
        ("modules_to_save", ["classifier"]),
        ("lora_bias", True),
        ("fan_in_fan_out", True),
        ("ensure_weight_tying", True),
        ("init_lora_weights", "pissa_niter_4"),
    ],
)
def test_unsupported_peft_options_are_refused_by_name(option, value, tmp_path, tokenizer):
    _write_adapter(tmp_path, tokenizer, **{option: value})
    with pytest.raises(AffinageError, match=option) as error:
        load_adapter(tiny_llama(len(tokenizer)), tmp_path)
    assert "adapter_config.json" in str(error.value) and "fix:" in str(error.value)


def test_loading_into_a_model_with_other_lora_settings_is_refused(tmp_path, tokenizer):
    _write_adapter(tmp_path, tokenizer)
    model = tiny_llama(len(tokenizer))
    inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0, use_rslora=True)
    with pytest.raises(AffinageError, match="scaling"):
        load_adapter(model, tmp_path)
    dora = tiny_llama(len(tokenizer))
    inject_lora(dora, ["q_proj"], r=2, alpha=4, dropout=0.0, use_dora=True)
    with pytest.raises(AffinageError, match="lora_magnitude_vector"):
        load_adapter(dora, tmp_path)


def test_adapter_config_fields():
    adapter = config_from_dict(
        {
            "adapter": {
                "use_rslora": True,
                "use_dora": True,
                "init": "pissa",
                "rank_pattern": {"down_proj": 32},
                "alpha_pattern": {"q_proj": 8},
                "target_modules": "q_proj,lm_head,embed_tokens",
            }
        }
    ).adapter
    assert adapter.use_rslora and adapter.use_dora and adapter.init == "pissa"
    assert adapter.rank_pattern == {"down_proj": 32} and adapter.alpha_pattern == {"q_proj": 8.0}
    assert adapter.target_modules == ["q_proj", "lm_head", "embed_tokens"]
    for bad in ({"init": "olora"}, {"rank_pattern": {"q_proj": 0}}, {"alpha_pattern": {"q_proj": -1}}):
        with pytest.raises(ConfigError):
            config_from_dict({"adapter": bad})
