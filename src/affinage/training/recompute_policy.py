"""Which forward passes recompute their blocks in backward (activation checkpointing).

Why a policy: recomputing buys memory with one more forward pass of compute, and a LoRA step on
a frozen base is only about two forward passes of work, so a recomputed forward takes ~1.5x the
time (SmolLM2, one 2048-token row, bf16: 257 vs 370 tokens/s). A micro-batch over the token
budget is split into rows instead, which costs nothing; only a single row over the budget has
no cheaper way down. ``auto`` recomputes such a row only when what its forward keeps for
backward would exceed :data:`ACTIVATION_SHARE` of the machine's memory (the share the
frozen-prefix cache may take too). The bytes a token keeps are measured, not modelled: one short
forward of the model itself under autograd's saved-tensor hooks, at three lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from affinage.runtime import machine_memory_bytes
from affinage.training.loop import training_forms

T = TypeVar("T")

ACTIVATION_SHARE = 0.25  # glibc's heap about doubles a forward's kept bytes in RSS (docs/performance.md)
PROBE_TOKENS = (32, 64, 128)  # three lengths: per forward, per token, per token pair


def kept_bytes(forward: Callable[[], T], exclude: set[int]) -> tuple[T, int]:
    """``forward()``'s result and the bytes of the distinct storages autograd keeps for backward while it
    runs, ``exclude``'s storages (data pointers: the weights) left out."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, sum(saved.values())


class KeptBytes:
    """Bytes a training forward of one row of ``n`` tokens keeps for backward: ``c + p·n + q·n²`` (``q``: masks
    or scores materialised per row), fitted on three short forwards of ``model`` itself (SDPA attention,
    the form of rows over the blockwise limit), run on first use. The random state is left as it was."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self._coefficients: list[float] | None = None

    def __call__(self, tokens: int) -> float:
        if self._coefficients is None:
            try:
                measured = torch.tensor(self._probe(), dtype=torch.float64)
            except Exception:  # noqa: BLE001 - a decoder that cannot run alone: recompute every row over the budget
                self._coefficients = [math.inf, 0.0, 0.0]
            else:
                powers = torch.tensor([[1.0, n, n * n] for n in PROBE_TOKENS], dtype=torch.float64)
                self._coefficients = [max(0.0, c) for c in torch.linalg.solve(powers, measured).tolist()]
        constant, linear, quadratic = self._coefficients
        return constant + tokens * (linear + quadratic * tokens)

    def _probe(self) -> list[int]:
        model, device = self.model, self.device
        decoder = model.get_decoder()
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        measured, training = [], model.training
        model.train()  # dropout's masks are kept too
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), training_forms(model, False):
                for tokens in PROBE_TOKENS:
                    ids = torch.ones((1, tokens), dtype=torch.long, device=device)
                    measured.append(kept_bytes(lambda ids=ids: decoder(input_ids=ids, use_cache=False), weights)[1])
        finally:
            model.train(training)
        return measured


def recompute_above(setting: bool | str, budget: int | None, longest: int, kept: Callable[[int], float]) -> int | None:
    """Forwards with more tokens than this recompute their blocks: 0 for all (``True``), None for none.

    ``auto``: a forward within ``budget`` never does; a longer one (a single row the budget cannot
    split, ``longest`` tokens at most) only when ``kept(tokens)`` bytes would exceed
    :data:`ACTIVATION_SHARE` of the machine's memory (``kept`` is called only if some row is over the budget)."""
    if setting != "auto":
        return 0 if setting else None
    if budget is None or longest <= budget:
        return budget
    allowed = ACTIVATION_SHARE * machine_memory_bytes()
    if kept(longest) <= allowed:
        return None
    low, high = budget, longest - 1  # the longest forward that fits: kept grows with the tokens
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if kept(middle) <= allowed else (low, middle - 1)
    return low
