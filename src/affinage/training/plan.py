"""What a run will feed the loop: its batches, its loss functions and how long it lasts.

The decisions that depend on the data and the machine are taken here, once, before the first
step: pack examples into rows or not, run the frozen lower blocks once per example (the
frozen-prefix cache) or not, and how many tokens one forward pass may hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from affinage import distributed
from affinage.config import TrainerConfig
from affinage.data.batching import bucketed_batches, collate, collate_packed, padding_share
from affinage.data.template import Encoded
from affinage.training.losses import CPU, LossFn, causal_lm_loss, full_logits_loss
from affinage.training.prefix_cache import (
    PREFIX_TOKENS_AHEAD,
    FrozenPrefix,
    PrefixStates,
    cache_fits,
    frozen_boundary,
)
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


def prefix_windows(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    share: tuple[int, int] = (0, 1),
    tokens: int = PREFIX_TOKENS_AHEAD,
) -> list[list[int]]:
    """The rows whose frozen-prefix states are computed together (:class:`PrefixStates`): this process's rows in
    the first epoch's batch order, cut every ``tokens`` tokens, then the other processes' rows (which a later
    epoch's shuffle may hand it) in the same way."""
    rank, processes = share
    batches = bucketed_batches(lengths, batch_size, seed)
    mine = [i for batch in batches for i in batch[rank::processes]]
    taken = set(mine)
    others = [i for batch in batches for i in batch if i not in taken]
    windows: list[list[int]] = []
    for rows in (mine, others):
        current, size = [], 0
        for index in rows:
            current.append(index)
            size += lengths[index]
            if size >= tokens:
                windows.append(current)
                current, size = [], 0
        if current:
            windows.append(current)
    return windows


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
    setup_seconds: float = 0.0  # a frozen-prefix pass run up front (``prefix_up_front``): training time too
    prefix_states: tuple[PrefixStates, PrefixStates] | None = None  # train's, valid's (computed as needed)

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
        prefix_up_front: bool = False,
    ) -> BatchPlan:
        """Decide packing, prefix cache, token budget and recomputation for ``model`` (LoRA already trainable).

        The frozen-prefix states are computed as the batches need them (inside the steps, on their clock);
        ``prefix_up_front`` computes them all here instead, timed in ``setup_seconds`` (a benchmark that
        leaves its first steps out of its rate must still count the pass)."""
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
            plan._cache_prefix(model, boundary, device, prefix_up_front)
        if sharded:
            plan.train_loss_fn, plan.valid_loss_fn = through_root(loss_fn), through_root(loss_fn)
        return plan

    def _cache_prefix(self, model: nn.Module, boundary: int, device: torch.device, up_front: bool) -> None:
        """The loss functions start above the frozen blocks, from states computed a window at a time."""
        prefix = FrozenPrefix(model, boundary)
        lengths = [len(e.input_ids) for e in self.train_data]
        share = (distributed.rank(), distributed.world_size())
        windows = prefix_windows(lengths, self.batch_size, self.seed, share)
        train = PrefixStates(prefix, self.train_data, windows, self.pad_id, device, self.pad_multiple)
        # validation scores every row, and once it starts it needs them all: one window
        everything = [list(range(len(self.valid_data)))] if self.valid_data else []
        valid = PrefixStates(prefix, self.valid_data, everything, self.pad_id, device, self.pad_multiple)
        self.train_loss_fn = prefix.wrap(self.train_loss_fn, train)
        self.valid_loss_fn = prefix.wrap(self.valid_loss_fn, valid)
        self.prefix_states = (train, valid)
        if up_front:
            train.compute_all()
            valid.compute_all()
            self.setup_seconds = train.seconds + valid.seconds

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
