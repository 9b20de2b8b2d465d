"""Gated MLPs that keep two tensors for backward instead of three.

``down(act(gate(x)) * up(x))`` (Llama, Gemma, Mistral, Qwen...) written with stock ops keeps
``gate(x)`` (for the activation's backward), ``act(gate(x))`` and ``up(x)`` (for the product's
backward): three intermediate-size tensors per token and block, the largest activations of a
training step. :class:`_GatedProduct` keeps ``gate(x)`` and ``up(x)`` and recomputes the
activation in backward (one elementwise pass): -1/3 of the MLP's saved activations, the same
values and gradients (``tests/test_gated_mlp.py``).

Only MLP classes whose ``forward`` is exactly that expression are touched, and only for the
duration of training (:func:`recompute_gated_activations` restores them).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

GATED_FORM = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(_GatedProduct.apply(gate, up, self.act_fn))


def _is_gated(module: nn.Module) -> bool:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        return GATED_FORM in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


@contextmanager
def recompute_gated_activations(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's gated MLPs recompute their activation in backward; yields how many."""
    patched = [module for module in model.modules() if _is_gated(module)]
    for module in patched:
        module.forward = types.MethodType(_forward, module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
