"""The learning-rate schedule: a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Callable

from affinage.config import TrainerConfig


def get_lr(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """``cfg``'s schedule over ``total_steps`` as ``lr_at(step)``, what the loop takes."""
    warmup_steps = int(cfg.warmup_ratio * total_steps)

    def lr_at(step: int) -> float:
        return get_lr(step, total_steps, cfg.learning_rate, warmup_steps, cfg.lr_scheduler)

    return lr_at
