"""Gated MLPs recompute their activation in backward (and the LoRA down projection its input): same loss and
gradients, less kept."""

import pytest
import torch

from affinage.lora import mark_only_lora_as_trainable
from affinage.training.gated_mlp import recompute_gated_activations
from tests.conftest import assert_same_step, step_without_and_with, tiny_gemma3, tiny_llama, training_batch


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_same_loss_and_gradients_with_fewer_saved_bytes(build, tokenizer):
    model, batch = training_batch(build, tokenizer)
    mark_only_lora_as_trainable(model)  # a frozen base keeps no input of its own
    plain, patched = step_without_and_with(model, batch, recompute_gated_activations)
    count = patched.value
    assert count == len(model.get_decoder().layers)
    assert_same_step(plain, patched)
    mlp = model.config.intermediate_size * batch["input_ids"].numel() * 4  # one intermediate-size fp32 tensor per block
    # act(gate) is not kept, nor act(gate) * up, which the LoRA down projection recomputes from gate and up
    assert plain.saved - patched.saved >= 1.99 * mlp * count
    assert "forward" not in vars(model.get_decoder().layers[0].mlp)  # restored after the block


@pytest.mark.parametrize("name", ["silu", "swish", "gelu_pytorch_tanh", "gelu", "relu"])
def test_the_activations_kernel_gives_autograds_gradient(name):
    from transformers.activations import ACT2FN

    from affinage.training.gated_mlp import _GatedProduct, activation_derivative

    act = ACT2FN[name]
    assert (activation_derivative(act) is None) == (name == "relu")  # relu: the generic path
    gate, up = (torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(3, 7, 16, dtype=torch.float64)
    expected = torch.autograd.grad(act(gate) * up, (gate, up), grad)
    got = torch.autograd.grad(_GatedProduct.apply(gate, up, act, activation_derivative(act)), (gate, up), grad)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference)


def test_backward_computes_the_activation_once_per_block(tokenizer):
    """The LoRA down projection recomputes act(gate) * up for its A gradient; the product's own
    backward takes that act(gate) instead of computing it a second time."""
    from affinage.training import causal_lm_loss

    model, batch = training_batch(tiny_llama, tokenizer)
    mark_only_lora_as_trainable(model)
    with recompute_gated_activations(model) as count:
        loss, tokens = causal_lm_loss(model, batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            (loss / tokens).backward()
    silu = sum(e.count for e in profile.key_averages() if e.key == "aten::silu")
    assert silu == count  # one per block (it was two: the recompute's and the product's)
