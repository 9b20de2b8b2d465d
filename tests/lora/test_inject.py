import pytest
import torch

from affinage.errors import ConfigError
from affinage.lora import find_targets, fuse_lora, inject_lora, load_adapter, lora_modules, save_adapter
from tests.conftest import tiny_gemma3, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_all_linear_skips_the_head_and_works_on_each_architecture(build, tokenizer):
    model = build(len(tokenizer))
    names = inject_lora(model, "all-linear", r=2, alpha=4, dropout=0.0)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert "lm_head" not in names


def test_unknown_target_lists_the_available_ones(tokenizer):
    with pytest.raises(ConfigError, match="q_proj"):
        find_targets(tiny_llama(len(tokenizer)), ["query"])


def _randomise(model):
    torch.manual_seed(1)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.05)


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, tokenizer, model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inject_lora(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.0)
    _randomise(ours)
    save_adapter(ours, tmp_path / "adapter", str(model_dir))
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter"
    ).eval()
    ids = torch.tensor([tokenizer("Facture en retard, merci")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_we_load_a_peft_adapter_with_the_same_logits(tmp_path, tokenizer, model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tmp_path / "peft")
    ids = torch.tensor([tokenizer("Candidature spontanée")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_fuse_gives_the_same_logits(tokenizer):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    _randomise(model)
    ids = torch.tensor([tokenizer("Relance de paiement")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        fuse_lora(model)
        after = model(ids).logits
    assert not lora_modules(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
