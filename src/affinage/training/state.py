"""The run's progress: counters, best validation, non-finite counts and the metrics so far.

What a checkpoint adds to it (adapter, optimizer, RNG states, data cursor) is gathered by
:mod:`affinage.training.checkpoint`; this dataclass stays plain numbers and lists, so it goes to
JSON as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where the run stands; everything here is JSON."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included): the schedule's position
    batches: int = 0  # micro-batches taken from the stream: where a resumed run picks it up
    tokens: int = 0  # real (non-padding) tokens trained on
    seconds: float = 0.0  # time spent in training steps (the frozen-prefix pass runs inside them)
    best_loss: float | None = None  # validation loss of the best adapter
    best_step: int | None = None
    best_score: float | None = None  # task score of the best adapter, when one is computed
    stale: int = 0  # validations since the best one: early stopping's count
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nonfinite_streak: int = 0  # ... in a row, up to now
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records so far

    def to_dict(self) -> dict[str, Any]:
        """The state as a plain dict (a copy: later steps do not change a checkpoint already taken)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Unknown keys (from a newer version) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def record_validation(self, step: int, loss: float, score: float | None, *, by_score: bool) -> bool:
        """Count one validation; whether it beats the best so far (highest score, else lowest loss)."""
        if by_score:
            improved = self.best_score is None or (score is not None and score > self.best_score)
        else:
            improved = self.best_loss is None or loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.best_score, self.stale = loss, step, score, 0
        else:
            self.stale += 1
        return improved
