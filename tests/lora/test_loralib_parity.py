"""Parity with the loralib package on the same weights: outputs, merge on eval, state dicts."""

import pytest
import torch
from torch import nn

from affinage import lora

loralib = pytest.importorskip("loralib")

CASES = [
    ("Linear", lambda m: m.Linear(12, 10, r=4, lora_alpha=8), lambda: torch.randn(3, 12)),
    (
        "Linear fan_in_fan_out",
        lambda m: m.Linear(12, 10, r=4, lora_alpha=8, fan_in_fan_out=True),
        lambda: torch.randn(3, 12),
    ),
    ("Embedding", lambda m: m.Embedding(30, 8, r=4, lora_alpha=8, padding_idx=0), lambda: torch.randint(0, 30, (2, 7))),
    (
        "MergedLinear qv",
        lambda m: m.MergedLinear(12, 18, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lambda: torch.randn(3, 12),
    ),
    (
        "MergedLinear fan_in_fan_out",
        lambda m: m.MergedLinear(12, 18, r=2, lora_alpha=4, enable_lora=[False, True, True], fan_in_fan_out=True),
        lambda: torch.randn(2, 5, 12),
    ),
    ("Conv2d", lambda m: m.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 3, 8, 8)),
    ("Conv2d groups", lambda m: m.Conv2d(4, 6, 3, r=2, lora_alpha=4, groups=2), lambda: torch.randn(2, 4, 7, 7)),
]


@pytest.mark.parametrize("name, build, inputs", CASES, ids=[c[0] for c in CASES])
def test_same_outputs_as_loralib_in_train_and_eval(name, build, inputs):
    torch.manual_seed(0)
    theirs = build(loralib)
    ours = build(lora)
    state = theirs.state_dict()
    with torch.no_grad():  # give B non-zero values so the update is visible
        for key, value in state.items():
            if "lora_" in key:
                value.normal_(std=0.1)
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    x = inputs()
    theirs.train()
    ours.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.eval()
    ours.eval()
    assert ours.merged == theirs.merged
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-5)
    ours.train()
    theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_marking_and_state_dict_match_loralib(bias):
    def model(m):
        torch.manual_seed(0)
        return nn.Sequential(
            m.Linear(6, 6, r=2, bias=True),
            m.Embedding(10, 6, r=2),
            m.MergedLinear(6, 6, r=2, enable_lora=[True, False]),
            nn.Linear(6, 2),
        )

    theirs, ours = model(loralib), model(lora)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert set(lora.lora_state_dict(ours, bias=bias)) == set(loralib.lora_state_dict(theirs, bias=bias))


@pytest.mark.parametrize(
    "layer, x",
    [
        (lambda: lora.Conv1d(4, 6, 3, r=2, lora_alpha=4), torch.randn(2, 4, 9)),
        (lambda: lora.Conv3d(2, 4, 3, r=2, lora_alpha=4), torch.randn(1, 2, 5, 5, 5)),
    ],
)
def test_conv1d_and_conv3d_merge_exactly(layer, x):
    """loralib's own Conv1d/Conv3d raise a shape error; ours give the same output merged or not."""
    torch.manual_seed(0)
    module = layer()
    torch.nn.init.normal_(module.lora_B, std=0.1)
    module.train()
    unmerged = module(x)
    module.eval()
    assert module.merged
    torch.testing.assert_close(module(x), unmerged, rtol=1e-5, atol=1e-5)
