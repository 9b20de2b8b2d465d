"""Stratified train/valid/test split without leakage.

Seed 003's rules: shuffle first, keep every class in every split in its proportion, and never
let the same email appear in two splits. Duplicates and near-duplicates (``affinage.data.dedup``:
same text up to case, accents, symbols and spacing, or similar above a threshold) are grouped
and always land in the same split.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

from affinage.data.dedup import duplicate_groups

T = TypeVar("T")


def strata(labels: Sequence[str]) -> list[str]:
    """The labels to stratify by: themselves when they form a label set, else one stratum.

    Free-text answers are (almost) all distinct; stratifying by them would put every example
    in train. A label set has at most max(20, n/10) distinct values.
    """
    if len(set(labels)) <= max(20, len(labels) // 10):
        return list(labels)
    return ["(all)"] * len(labels)


def lonely_label(strata_labels: Sequence[str]) -> str | None:
    """A label seen once in a label set: it cannot be both trained on and tested."""
    if not strata_labels or strata_labels[0] == "(all)":
        return None
    counts: dict[str, int] = defaultdict(int)
    for label in strata_labels:
        counts[label] += 1
    return next((label for label in sorted(counts) if counts[label] == 1), None)


def _allocate(count: int, ratios: Sequence[float]) -> list[int]:
    """Split ``count`` items by ``ratios`` (largest remainder), at least one per non-zero ratio when possible."""
    total = sum(ratios)
    exact = [count * r / total for r in ratios]
    sizes = [int(x) for x in exact]
    for index in sorted(range(len(ratios)), key=lambda i: exact[i] - sizes[i], reverse=True)[: count - sum(sizes)]:
        sizes[index] += 1
    # A class with enough members appears in every split (valid/test must cover all classes).
    for index, ratio in enumerate(ratios):
        if ratio > 0 and sizes[index] == 0 and count >= len([r for r in ratios if r > 0]):
            donor = max(range(len(sizes)), key=lambda i: sizes[i])
            sizes[donor] -= 1
            sizes[index] += 1
    return sizes


def stratified_split(
    items: Sequence[T],
    labels: Sequence[str],
    texts: Sequence[str],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    near_duplicate_threshold: float | None = None,
) -> list[list[T]]:
    """Partition ``items`` into ``len(ratios)`` lists, stratified by label, duplicates kept together.

    ``near_duplicate_threshold``: None keeps exact duplicates together only (callers pass
    ``data.split.near_duplicate_threshold``). Deterministic for a given seed.
    """
    return split_groups(items, labels, duplicate_groups(texts, near_duplicate_threshold), ratios, seed)


def split_groups(
    items: Sequence[T],
    labels: Sequence[str],
    groups: Sequence[Sequence[int]],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
) -> list[list[T]]:
    """Partition ``items`` with each group of indices as one unit, so no group spans two splits.

    ``groups`` covers every index once (``dedup.duplicate_groups``); a group's label is its first
    member's. Callers that report the groups compute them once and pass them here.
    """
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups:
        by_label[labels[members[0]]].append(list(members))
    rng = random.Random(seed)
    splits: list[list[int]] = [[] for _ in ratios]
    for label in sorted(by_label):
        label_groups = by_label[label]
        rng.shuffle(label_groups)
        sizes = _allocate(len(label_groups), ratios)
        start = 0
        for split_index, size in enumerate(sizes):
            for members in label_groups[start : start + size]:
                splits[split_index].extend(members)
            start += size
    for split in splits:
        rng.shuffle(split)
    return [[items[i] for i in split] for split in splits]
