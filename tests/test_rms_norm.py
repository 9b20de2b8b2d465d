"""RMSNorm's fused backward: the stock forms' values and gradients, and only where it is recognised."""

import pytest
import torch
from torch import nn

from affinage.lora import mark_only_lora_as_trainable
from affinage.training.rms_norm import fused_rms_norms
from tests.conftest import assert_same_step, step_without_and_with, tiny_gemma3, tiny_llama, training_batch


def _norm_class(build):
    return type(build(300).get_decoder().norm)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_input_gradient_are_the_stock_forms(build, dtype):
    stock = _norm_class(build)(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        stock.weight.normal_()
    stock.weight.requires_grad_(False)
    x = (torch.randn(3, 5, 64, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64, dtype=torch.float64).to(dtype)
    expected = stock(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    holder = nn.Sequential(stock)
    with fused_rms_norms(holder) as count:
        got = stock(x)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        with torch.no_grad():  # the frozen-prefix pass, validation: the same forward, nothing kept
            inferred = stock(x)
    assert count == 1 and "forward" not in vars(stock)  # swapped, then restored
    assert got.grad_fn.name() == "_RMSNormBackward"
    assert torch.equal(inferred, got.detach())
    tolerance = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got_grad, expected_grad, **tolerance)


def test_a_norm_that_trains_or_is_unknown_keeps_its_forward():
    llama_norm = _norm_class(tiny_llama)(8)
    other = nn.LayerNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    with fused_rms_norms(nn.Sequential(llama_norm, other)) as count:
        assert count == 1  # LayerNorm is not an RMSNorm form
        assert llama_norm(x).grad_fn.name() != "_RMSNormBackward"  # its weight trains
        llama_norm.weight.requires_grad_(False)
        assert llama_norm(x).grad_fn.name() == "_RMSNormBackward"


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_a_training_step_has_the_stock_loss_and_gradients(build, tokenizer):
    model, batch = training_batch(build, tokenizer)
    mark_only_lora_as_trainable(model)  # a frozen base keeps no input of its own
    plain, fused = step_without_and_with(model, batch, fused_rms_norms)
    assert fused.value == 2 * model.config.num_hidden_layers + 1 + (4 * 2 if build is tiny_gemma3 else 0)
    assert_same_step(plain, fused, rtol=1e-4, atol=1e-6)
    # The stock ops keep x (fp32 for Gemma), and the LoRA projections the normed output; the fused norm keeps x
    # and one value per row, and the projections recompute the output from them (affinage.recompute). Not in
    # block 0's first norm: its input (the frozen embeddings' output) was kept by no one, so it is kept instead.
    hidden = model.config.hidden_size * batch["input_ids"].numel() * 4
    assert plain.saved - fused.saved >= 0.99 * hidden * (2 * model.config.num_hidden_layers - 1)
