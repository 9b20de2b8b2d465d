"""Gated MLPs recompute their activation in backward: same loss and gradients, less kept."""

from contextlib import nullcontext

import pytest
import torch

from affinage.data.batching import collate
from affinage.training import causal_lm_loss
from affinage.training.gated_mlp import recompute_gated_activations
from tests.conftest import adapted_tiny, saved_bytes, tiny_gemma3, tiny_llama, trainable_grads
from tests.test_train import _encoded


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_same_loss_and_gradients_with_fewer_saved_bytes(build, tokenizer):
    model = adapted_tiny(build, tokenizer)
    model.train()
    batch = collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)
    results = []
    for patched in (False, True):
        model.zero_grad()
        with recompute_gated_activations(model) if patched else nullcontext() as count:
            (loss, n), saved = saved_bytes(lambda: causal_lm_loss(model, batch))
            (loss / n).backward()
        results.append((loss.detach(), saved, trainable_grads(model), count))
    (plain_loss, plain_saved, plain_grads, _), (loss, saved, grads, count) = results
    assert count == len(model.get_decoder().layers)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7)
    mlp = model.config.intermediate_size * batch["input_ids"].numel() * 4  # one intermediate-size fp32 tensor per block
    assert plain_saved - saved >= 0.99 * mlp * count
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
