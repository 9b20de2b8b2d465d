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

import functools
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, SiLUActivation

from affinage.recompute import recomputable

GATED_FORM = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


Activation = Callable[[torch.Tensor], torch.Tensor]
Derivative = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad of act(x), x) -> grad of x


def _gelu_approximation(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    if type(act) is GELUTanh and isinstance(act.act, functools.partial):  # not its Python formula
        return "tanh"
    if type(act) is GELUActivation and act.act is F.gelu:
        return "none"
    return None


def activation_derivative(act: nn.Module) -> Derivative | None:
    """ATen's fused backward kernel of the activation (SiLU, GELU exact or tanh), or None for another one.

    Why: the generic path differentiates ``act`` with autograd inside backward, 3x slower than
    calling its kernel (SmolLM2's MLP, 512 tokens: 3.75 ms vs 1.26 ms per block, fp32, 2 cores)."""
    if type(act) in (nn.SiLU, SiLUActivation):
        return torch.ops.aten.silu_backward
    approximate = _gelu_approximation(act)
    if approximate is None:
        return None
    return functools.partial(_gelu_backward, approximate=approximate)


def _gelu_backward(grad: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)


def _activated(act: Activation, gate: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``act(gate)``, and whether it is a fresh tensor (free to overwrite) rather than ``gate``'s memory
    (an identity or in-place activation)."""
    out = act(gate)
    return out, out.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()


def _product(act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out, fresh = _activated(act, gate)
    return out.mul_(up) if fresh else out * up  # in place: no second intermediate-size temporary


class _Handoff:
    """``act(gate)`` from a consumer's recompute of the product in backward, for the product's own
    backward, which runs next: the activation is computed once in backward, not twice."""

    def __init__(self) -> None:
        self.activated: torch.Tensor | None = None

    def recompute(self, act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        activated, fresh = _activated(act, gate)
        self.activated = activated if fresh else None
        return activated * up

    def take(self) -> torch.Tensor | None:
        """The handed-off act(gate) (fresh: free to overwrite), or None; the hand-off is dropped either way."""
        activated, self.activated = self.activated, None
        return activated


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, gate: torch.Tensor, up: torch.Tensor, act: Activation, derivative: Derivative | None
    ) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.derivative, ctx.handoff = act, derivative, _Handoff()
        # A LoRA down projection recomputes its input from gate and up, kept here (affinage.recompute).
        compute = functools.partial(ctx.handoff.recompute, act)
        return recomputable(_product(act, gate, up), compute, gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        handed = ctx.handoff.take()
        if ctx.derivative is not None:
            grad_gate = ctx.derivative(grad * up, gate) if ctx.needs_input_grad[0] else None
            grad_up = None
            if ctx.needs_input_grad[1]:
                activated, fresh = (handed, True) if handed is not None else _activated(ctx.act, gate)
                grad_up = activated.mul_(grad) if fresh else activated * grad
            return grad_gate, grad_up, None, None
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(_product(self.act_fn, gate, up))
    return self.down_proj(_GatedProduct.apply(gate, up, self.act_fn, activation_derivative(self.act_fn)))


def _is_gated(module: nn.Module) -> bool:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    return _gated_class(type(module))


@functools.cache
def _gated_class(cls: type) -> bool:
    """Whether ``cls.forward`` is :data:`GATED_FORM`, read once per class (not once per block)."""
    try:
        return GATED_FORM in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


@contextmanager
def recompute_gated_activations(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's gated MLPs recompute their activation in backward; yields how many it
    switched. An MLP whose ``forward`` is already its own (switched by an outer block) is left alone."""
    patched = [module for module in model.modules() if "forward" not in module.__dict__ and _is_gated(module)]
    for module in patched:
        module.forward = types.MethodType(_forward, module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
