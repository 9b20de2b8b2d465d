"""Group encoded examples into padded batches with little padding.

Batches are cut from length-sorted chunks of the shuffled data (length bucketing), so a
batch holds examples of similar length and almost no FLOP is spent on padding, while the
order of batches stays random from epoch to epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from affinage.data.template import Encoded


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, bucket_factor: int = 16) -> list[list[int]]:
    """Indices of each batch for one epoch: shuffle, sort within chunks, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (``trainer.pad_to_multiple_of``).

    Why: a batch's width sets the shapes of every product in the step. oneDNN (bf16 on CPU) compiles
    a kernel for each new shape (~4 ms for one 640 x 2,048 product) and keeps 1,024 of them, so
    widths that take every value from 1 to 128 keep compiling; multiples of 8 take 16."""
    return -(-longest // multiple) * multiple


def collate(
    examples: Sequence[Encoded], pad_id: int, indices: Sequence[int] | None = None, multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to ``multiple`` (:func:`padded_width`); padded
    positions carry no loss and no attention.

    ``indices`` (the examples' positions in their data set) travel with the batch for
    per-example caches (see ``affinage.training.prefix_cache``).
    """
    width = padded_width(max(len(e.input_ids) for e in examples), multiple)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if indices is not None:
        batch["indices"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example positions into rows of at most ``capacity`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[slot].append(index)
            room[slot] -= lengths[index]
    return rows


def collate_packed(examples: Sequence[Encoded], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Several examples per row, none attending to another: position ids restart at each example.

    No attention mask is passed to the model: transformers derives the block-diagonal causal
    mask from the restarting position ids (its packed-sequence path). The first token of each
    example carries no label, exactly as in an unpacked row where nothing precedes it.
    ``attention_mask`` stays in the batch only to count real tokens.
    """
    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            example = examples[index]
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            labels[r, start] = -100
            positions[r, start : start + n] = torch.arange(n)
            real[r, start : start + n] = 1
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding tail is a segment of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": real}


def padding_share(lengths: Sequence[int], batch_size: int, seed: int = 0) -> float:
    """Share of the tokens of bucketed batches that are padding (what packing could save)."""
    batches = bucketed_batches(lengths, batch_size, seed)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / max(padded, 1)


def split_rows(
    batch: dict[str, torch.Tensor], max_tokens: int | None, multiple: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Cut a batch into row groups of at most ``max_tokens`` padded tokens, each trimmed to its own width
    (rounded up to ``multiple``, as :func:`collate` pads).

    Activation memory grows with the tokens of one forward pass; a long micro-batch run as
    several forwards (gradients summed) peaks lower and gives the same gradient. Rows are
    right-padded (``attention_mask`` marks real tokens from the left), so a group of shorter
    rows also drops the padding only its longer neighbours needed. A single row is never cut.
    """
    rows, width = batch["input_ids"].shape
    if max_tokens is None or rows * width <= max_tokens or rows == 1:
        return [batch]
    per_group = max(1, max_tokens // width)
    groups = []
    for start in range(0, rows, per_group):
        group = {key: value[start : start + per_group] for key, value in batch.items()}
        used = min(width, padded_width(int(group["attention_mask"].sum(dim=1).max()), multiple))
        groups.append({key: value[:, :used] if value.dim() == 2 else value for key, value in group.items()})
    return groups
