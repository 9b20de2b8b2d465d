import torch
from torch import nn

from affinage import lora


def test_loralib_linear_merges_on_eval_and_unmerges_on_train():
    torch.manual_seed(0)
    layer = lora.Linear(12, 8, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 12)
    layer.train()
    unmerged = layer(x)
    weight_before = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, weight_before, rtol=1e-6, atol=1e-6)


def test_mark_only_lora_as_trainable_and_state_dict():
    model = nn.Sequential(lora.Linear(6, 6, r=2), nn.ReLU(), nn.Linear(6, 2))
    lora.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B"}
    assert set(lora.lora_state_dict(model)) == {"0.lora_A", "0.lora_B"}
    assert set(lora.lora_state_dict(model, bias="all")) == {"0.lora_A", "0.lora_B", "0.bias", "2.bias"}
    assert set(lora.lora_state_dict(model, bias="lora_only")) == {"0.lora_A", "0.lora_B", "0.bias"}


def test_checkpoint_round_trip_with_strict_false():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(6, 6, r=2))
    nn.init.normal_(model[0].lora_B)
    state = lora.lora_state_dict(model)
    fresh = nn.Sequential(lora.Linear(6, 6, r=2))
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.load_state_dict(state, strict=False)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), model(x))


def test_lora_linear_starts_equal_to_base_and_fuses_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 10)
    wrapped = lora.LoRALinear.from_base(base, r=4, alpha=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(wrapped(x), base(x))
    nn.init.normal_(wrapped.lora_B.weight)
    fused = wrapped.fuse()
    torch.testing.assert_close(fused(x), wrapped(x), rtol=1e-5, atol=1e-5)


def test_shared_dropout_draws_one_mask_per_input_tensor():
    from affinage.lora.layers import LoRALinear, SharedDropout, share_dropout

    torch.manual_seed(0)
    block = torch.nn.ModuleDict(
        {name: LoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.5) for name in ("q", "k", "o")}
    )
    assert share_dropout(block) == 3 and block["q"].lora_dropout is block["k"].lora_dropout
    assert isinstance(block["q"].lora_dropout, SharedDropout)
    block.train()
    x, other = torch.randn(4, 16), torch.randn(4, 16)
    dq, dk = block["q"].lora_dropout(x), block["k"].lora_dropout(x)
    assert torch.equal(dq, dk)  # q and k read the same tensor: one draw
    do = block["o"].lora_dropout(other)
    assert not torch.equal(do, dq) and set(((do == 0) | torch.isclose(do, other * 2)).flatten().tolist()) == {True}
    assert not torch.equal(block["q"].lora_dropout(x.clone()), dq)  # another tensor (even equal) gets a fresh draw
    block.eval()
    assert block["q"].lora_dropout(x) is x
