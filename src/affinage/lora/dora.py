"""DoRA (weight-decomposed LoRA), PEFT's formulation.

The adapted weight is ``m ⊙ (W + s·B·A) / ‖W + s·B·A‖``: a trainable magnitude ``m`` (one
value per output feature of a linear layer, per embedding dimension of an embedding table)
times the direction of the LoRA-updated weight. As in the paper (section 4.3) and PEFT, the
norm is treated as a constant: it is computed outside autograd, so gradients reach ``m``,
``A`` and ``B`` through the two terms of the forward pass only::

    out = base(x) + (m/‖·‖ − 1)·(W·x) + (m/‖·‖)·s·B(A(x))

``B·A`` is formed once per forward pass for the norm (as PEFT does); per token the update
stays ``B(A(x))``.
"""

from __future__ import annotations

import torch

from affinage.errors import ConfigError


def weight_norm(weight: torch.Tensor, delta: torch.Tensor, dim: int) -> torch.Tensor:
    """Norms of ``weight + delta`` along ``dim`` (1: per output row), fp32, detached."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.float() + delta.float(), dim=dim)


def magnitude_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, dim: int) -> torch.Tensor:
    """``m / ‖W + ΔW‖``: differentiable in ``m`` only (the norm is a constant).

    A zero row (a padding token's row of a tied head, at init) would give 0/0: its norm is
    clamped to a tiny value, so that row's output stays the base's (zero) instead of NaN.
    """
    return magnitude / weight_norm(weight, delta, dim).clamp_min(_TINY)


_TINY = 1e-12


def dense_weight(layer: torch.nn.Module, what: str) -> torch.Tensor:
    """The layer's float weight, or a ConfigError for a quantized (bitsandbytes) layer."""
    weight = getattr(layer, "weight", None)
    quantized = type(layer).__name__ in {"Linear4bit", "Linear8bitLt"}
    if weight is None or quantized or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"{what} needs a full-precision base weight, but this layer is {type(layer).__name__}"
            + (f" ({weight.dtype})" if weight is not None else ""),
            where="adapter",
            fix="remove the quantization section (train on the bf16/fp32 base) or turn the option off",
        )
    return weight
