"""Tensors that backward can recompute from tensors it keeps anyway.

Why: a LoRA projection keeps its input for the gradient of ``A``. When that input is a cheap
function of tensors another operation already keeps for its own backward, keeping it too costs
memory for nothing: a gated MLP keeps ``gate`` and ``up`` and the down projection's LoRA kept
``act(gate) * up`` as well; an RMSNorm keeps its input and ``rstd`` and the q/k/v and gate/up
LoRAs kept the normed output as well. On SmolLM2 that is 2 x 576 + 1536 of the ~7,700 values a
block keeps per token: a quarter of a training step's activations.

The maker of such a tensor declares it with :func:`recomputable`; a consumer that would save it
asks :func:`recipe_of` and, given a recipe, saves its sources and calls it in backward. The
recipe must return exactly the tensor (the same operations in the same order), so gradients do
not change by a bit. The table holds tensors weakly: an entry dies with its tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary


@dataclass(frozen=True)
class Recipe:
    """``compute(*sources)`` gives the tensor back, bit for bit."""

    compute: Callable[..., torch.Tensor]
    sources: tuple[torch.Tensor, ...]


_RECIPES = WeakTensorKeyDictionary()


def recomputable(tensor: torch.Tensor, compute: Callable[..., torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
    """Declare ``tensor == compute(*sources)``, the sources being kept for backward by its maker; returns ``tensor``."""
    _RECIPES[tensor] = Recipe(compute, sources)
    return tensor


def recipe_of(tensor: torch.Tensor) -> Recipe | None:
    """How to recompute ``tensor`` from kept tensors, or None (then a consumer keeps it)."""
    return _RECIPES.get(tensor)
