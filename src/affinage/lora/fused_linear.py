"""Frozen linear layers and their LoRA updates, for every layer that reads one tensor, as one autograd node.

``y_i = W_i x + b_i + s_i B_i A_i dropout(x)`` for the members ``i`` of a group (q/k/v, gate/up,
see ``shared_input``) or for one layer alone. Written as separate layers, autograd runs a node per
base product, per ``B`` product and per ``A`` product, and sums the input gradients they return
(q/k/v and their stacked ``A``: three additions of an input-size tensor). Here backward
accumulates every base product's input gradient, and then the LoRA's, into one tensor within
the products themselves (``addmm_``), computes each ``B`` gradient as ``(hᵀ g)ᵀ`` (its rows read
in order: 30 % faster on CPU than autograd's ``gᵀ h`` for a 1,536-wide output), and scales on the
rank-r side. Values and gradients are those of the separate layers (``tests/lora/test_fused_linear.py``).

The ``A`` product, the dropout mask and what is kept for backward are those of
:class:`~affinage.lora.fused._MaskedProjection`: the input (or the tensors a
:func:`~affinage.recompute.recomputable` input is made from), the mask as bits, the rank-r hidden.
Only frozen, unhooked ``nn.Linear`` bases of the input's dtype go here
(:func:`plain_base`); the others keep the separate path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from affinage.lora.fused import (
    applied_scale,
    compute_dtype,
    input_grad,
    keep_for_backward,
    kept_input,
    masked,
    projected,
)
from affinage.module_hooks import bypassable


def plain_base(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` (a LoRA wrapper) has a frozen ``nn.Linear`` base (weight and bias) in ``x``'s dtype,
    the dtype its update runs in too, :func:`~affinage.module_hooks.bypassable` (no hook, no instance
    ``forward``): the base's product may then join the update's node (the base module is not called)."""
    base = layer.base_layer
    return (
        type(base) is nn.Linear
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and bypassable(base)
        and base.weight.dtype == x.dtype == compute_dtype(x, layer.lora_A.weight)
    )


@dataclass(frozen=True)
class _Members:
    """What the node needs of its layers besides the trainable factors: the frozen bases, where each
    layer's rank-r columns lie in the stacked hidden, each layer's LoRA scaling, the dropout."""

    bases: tuple[nn.Linear, ...]
    columns: tuple[tuple[int, int], ...]
    scalings: tuple[float, ...]
    p: float
    dropout_scale: float


class _LoRALinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_a: torch.Tensor, keep: torch.Tensor | None, members: _Members, *factors):
        rows = x.reshape(-1, x.shape[-1])
        hidden, packed = projected(x, weight_a, keep, members.p, members.dropout_scale)
        hidden = hidden.reshape(rows.shape[0], -1)
        outputs = []
        for base, factor, (start, stop), scaling in zip(members.bases, factors, members.columns, members.scalings):
            out = F.linear(rows, base.weight, base.bias)
            outputs.append(out.addmm_(hidden[:, start:stop], factor.t(), alpha=scaling))
        ctx.members = members
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros to multiply
        ctx.save_for_backward(weight_a, packed, hidden, *factors, *keep_for_backward(ctx, x))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        members: _Members = ctx.members
        weight_a, packed, hidden, *rest = ctx.saved_tensors
        factors, kept = rest[: len(members.bases)], rest[len(members.bases) :]
        parts, grad_factors, grad_x = [], [], None
        needs_x = ctx.needs_input_grad[0]
        for grad, base, factor, (start, stop), scaling in zip(
            grads, members.bases, factors, members.columns, members.scalings
        ):
            if grad is None:  # this layer's output was not used
                parts.append(hidden.new_zeros(hidden.shape[0], stop - start))
                grad_factors.append(None)
                continue
            # dropout's 1/(1-p) and the LoRA scaling, both on the rank-r side
            parts.append((grad @ factor).mul_(scaling * members.dropout_scale))
            grad_factors.append((hidden[:, start:stop].t() @ grad).t().mul_(scaling) if factor.requires_grad else None)
            if needs_x:
                grad_x = grad @ base.weight if grad_x is None else grad_x.addmm_(grad, base.weight)
        grad_hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        x, keep = kept_input(ctx, kept, packed)
        grad_a = grad_hidden.t() @ masked(x, keep).reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        if needs_x:
            grad_x = input_grad(grad_hidden, weight_a, keep, grad_x).view(x.shape)
        return grad_x, grad_a, None, None, *grad_factors


def lora_linears(
    x: torch.Tensor, layers: Sequence[nn.Module], keep: torch.Tensor | None, p: float
) -> tuple[torch.Tensor, ...]:
    """Each layer's output on ``x`` as rows (2-D): base plus LoRA update, one node for all of them.

    ``layers``: LoRA wrappers whose bases are all :func:`plain_base` for ``x``; ``keep``: a shared
    dropout mask, or None to draw one here (``p > 0``) or for no dropout."""
    columns, start = [], 0
    for layer in layers:
        columns.append((start, start + layer.r))
        start += layer.r
    members = _Members(
        bases=tuple(layer.base_layer for layer in layers),
        columns=tuple(columns),
        scalings=tuple(float(layer.scaling) for layer in layers),
        p=p,
        dropout_scale=applied_scale(keep, p),
    )
    stacked_a = layers[0].lora_A.weight if len(layers) == 1 else torch.cat([layer.lora_A.weight for layer in layers])
    factors = [layer.lora_B.weight.to(x.dtype) for layer in layers]
    return _LoRALinears.apply(x, stacked_a.to(x.dtype), keep, members, *factors)
