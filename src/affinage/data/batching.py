"""Group encoded examples into padded batches with little padding.

Batches are cut from length-sorted chunks of the shuffled data (length bucketing), so a
batch holds examples of similar length and almost no FLOP is spent on padding, while the
order of batches stays random from epoch to epoch.
"""

from __future__ import annotations

import random
from typing import Sequence

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


def collate(examples: Sequence[Encoded], pad_id: int, indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions carry no loss and no attention.

    ``indices`` (the examples' positions in their data set) travel with the batch for
    per-example caches (see ``affinage.prefix_cache``).
    """
    width = max(len(e.input_ids) for e in examples)
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
