"""What a run will feed the loop: its batches, its loss functions and how long it lasts.

The decisions that depend on the data and the machine are taken here, once, before the first
step: pack examples into rows or not, run the frozen lower blocks once per example (the
frozen-prefix cache) or not, and how many tokens one forward pass may hold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from affinage import distributed
from affinage.config import TrainerConfig
from affinage.data.batching import bucketed_batches, collate, collate_packed, padding_share
from affinage.data.template import Encoded
from affinage.training.losses import CPU, LossFn, causal_lm_loss, full_logits_loss
from affinage.training.prefix_cache import FrozenPrefix, cache_fits, frozen_boundary
from affinage.training.recompute_policy import KeptBytes, recompute_above
from affinage.training.sharding import is_sharded, through_root

PACK_WHEN_PADDING_ABOVE = 0.15  # packing: auto packs when bucketed batches would be this much padding

CPU_TOKENS_PER_FORWARD = 512  # trainer.max_tokens_per_forward: auto on CPU (docs/performance.md)


def resolve_forward_budget(setting: int | str | None, device: torch.device) -> int | None:
    """Tokens per forward pass: ``auto`` is a budget on CPU (its matmuls are saturated well below
    it, so splitting costs no speed) and none on GPU, where batch size is the user's memory knob."""
    if setting == "auto":
        return CPU_TOKENS_PER_FORWARD if device.type == "cpu" else None
    return setting


def micro_batches(
    data: Sequence[Encoded],
    batch_size: int,
    seed: int,
    pad_id: int,
    pack_into: int | None = None,
    start: tuple[int, int] = (0, 0),
    share: tuple[int, int] = (0, 1),
    multiple: int = 1,
) -> Iterator[tuple[int, dict]]:
    """Endless stream of (epoch, batch), reshuffled every epoch with a seed derived from it.

    With ``pack_into`` the examples of a micro-batch are packed into rows of that many tokens:
    the same examples per step (same schedule, same loss), fewer padding tokens. ``start``
    (epoch, position in that epoch's order) begins mid-stream: a resumed run gets exactly the
    batches that remained, without collating the ones before.

    ``multiple``: each batch's width rounded up to it (``collate``, ``trainer.pad_to_multiple_of``).

    ``share`` (rank, processes) keeps one process's part of each batch: the order and the batches
    stay global, so a step sees the same examples on 1 or N processes. A share can be empty (a
    batch smaller than the processes): that rank gets ``{}`` and contributes no tokens.
    """
    lengths = [len(e.input_ids) for e in data]
    epoch, position = start
    rank, processes = share
    while True:
        for batch in bucketed_batches(lengths, batch_size, seed + epoch)[position:]:
            indices = batch[rank::processes]
            if not indices:
                yield epoch, {}
                continue
            examples = [data[i] for i in indices]
            yield (
                epoch,
                collate_packed(examples, pad_id, pack_into)
                if pack_into
                else collate(examples, pad_id, indices, multiple),
            )
        epoch, position = epoch + 1, 0


@dataclass
class BatchPlan:
    """The batch stream, loss functions and step counts of one run (see :meth:`build`)."""

    train_data: Sequence[Encoded]
    valid_data: Sequence[Encoded]
    batch_size: int
    seed: int
    pad_id: int
    pad_multiple: int  # batch widths rounded up to this (trainer.pad_to_multiple_of)
    pack_into: int | None  # packed rows of this many tokens (None: one example per row)
    prefix_cached: bool
    forward_budget: int | None  # tokens per forward pass (None: no limit)
    recompute_above: int | None  # a forward with more tokens recomputes its blocks (0: all; None: none)
    train_loss_fn: LossFn
    valid_loss_fn: LossFn
    total_steps: int
    eval_every: int
    setup_seconds: float = 0.0  # the one-off frozen-prefix pass: honest speed counts it as training time

    @property
    def packed(self) -> bool:
        return self.pack_into is not None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        train_data: Sequence[Encoded],
        valid_data: Sequence[Encoded],
        cfg: TrainerConfig,
        *,
        pad_id: int,
        device: torch.device = CPU,
        loss_fn: LossFn | None = None,
    ) -> BatchPlan:
        """Decide packing, prefix cache, token budget and recomputation for ``model`` (LoRA already trainable)."""
        loss_fn = loss_fn or (causal_lm_loss if cfg.logits_only_on_labels else full_logits_loss)
        steps_per_epoch = max(1, math.ceil(len(train_data) / cfg.batch_size) // cfg.gradient_accumulation)
        sharded = is_sharded(model)  # its blocks gather weights only inside the root's forward: no prefix pass
        cacheable = cfg.cache_frozen_blocks and cfg.packing is not True and not sharded
        boundary = frozen_boundary(model) if cacheable else None
        use_prefix_cache = bool(boundary) and cache_fits(list(train_data) + list(valid_data), model)
        # Packing and the frozen-prefix cache (per example) exclude each other; the cache saves more.
        waste = padding_share([len(e.input_ids) for e in train_data], cfg.batch_size, cfg.seed)
        pack = cfg.packing is True or (
            cfg.packing == "auto" and not use_prefix_cache and waste > PACK_WHEN_PADDING_ABOVE
        )
        budget = resolve_forward_budget(cfg.max_tokens_per_forward, device)
        longest = cfg.max_seq_len if pack else max((len(e.input_ids) for e in train_data), default=0)
        # A sharded model's blocks run only inside its root's forward: not probed, every row over the budget recomputes.
        kept = (lambda tokens: math.inf) if sharded else KeptBytes(model, device)
        plan = cls(
            train_data=train_data,
            valid_data=valid_data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            pad_id=pad_id,
            pad_multiple=cfg.pad_to_multiple_of,
            pack_into=cfg.max_seq_len if pack else None,
            prefix_cached=use_prefix_cache,
            forward_budget=budget,
            recompute_above=recompute_above(cfg.gradient_checkpointing, budget, longest, kept),
            train_loss_fn=loss_fn,
            valid_loss_fn=loss_fn,
            total_steps=cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch)),
            eval_every=cfg.eval_every or steps_per_epoch,
        )
        if use_prefix_cache:
            plan._cache_prefix(model, boundary, device)
        if sharded:
            plan.train_loss_fn, plan.valid_loss_fn = through_root(loss_fn), through_root(loss_fn)
        return plan

    def _cache_prefix(self, model: nn.Module, boundary: int, device: torch.device) -> None:
        """Run the frozen blocks once over both splits; the loss functions then start above them."""
        started = time.perf_counter()
        prefix = FrozenPrefix(model, boundary)
        train_cache = prefix.compute(self.train_data, self.pad_id, device, multiple=self.pad_multiple)
        self.train_loss_fn = prefix.wrap(self.train_loss_fn, train_cache)
        valid_cache = prefix.compute(self.valid_data, self.pad_id, device, multiple=self.pad_multiple)
        self.valid_loss_fn = prefix.wrap(self.valid_loss_fn, valid_cache)
        self.setup_seconds = time.perf_counter() - started

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one epoch's order (the same every epoch: only the shuffle changes)."""
        return math.ceil(len(self.train_data) / self.batch_size)

    def cursor(self, batches: int) -> dict[str, int]:
        """Where the stream stands after ``batches`` micro-batches: what a checkpoint records."""
        epoch, position = divmod(batches, self.batches_per_epoch)
        return {"epoch": epoch, "position": position, "batches": batches}

    def batches(self, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """The endless (epoch, micro-batch) stream, after its first ``skip`` micro-batches (a resumed run's)."""
        cursor = self.cursor(skip)
        start = (cursor["epoch"], cursor["position"])
        share = (distributed.rank(), distributed.world_size())
        return micro_batches(
            self.train_data, self.batch_size, self.seed, self.pad_id, self.pack_into, start, share, self.pad_multiple
        )
