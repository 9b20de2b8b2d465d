"""What stops a run early without losing it: a SIGTERM/SIGINT, and steps whose loss is not finite.

A signal only sets a flag: the loop finishes the step under way (so the checkpoint is exact),
writes a checkpoint and raises :class:`TrainingStopped`. torchelastic and most schedulers give
30 s before SIGKILL; one step and one checkpoint fit in that for the models affinage trains. A
second signal does not wait: it raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from types import FrameType, TracebackType

import torch

from affinage.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """While entered (in the main thread), SIGTERM and SIGINT ask the loop to stop after its step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def error(self, step: int, steps: int) -> TrainingStopped:
        """What the run raises once its checkpoint is written."""
        signum = self.signum or signal.SIGTERM  # another process of the run was signalled (torchrun signals all)
        name = signal.Signals(signum).name
        return TrainingStopped(
            f"stopped by {name} after step {step} of {steps}; a checkpoint of step {step} was written",
            fix="run the same `affinage train CONFIG --output DIR` command again: it resumes from that checkpoint",
            exit_code=128 + signum,
        )


def nonfinite(loss: float, grads: list[torch.Tensor]) -> str | None:
    """``"loss"`` or ``"gradient"`` when that is NaN or infinite (then the step must not update), else None."""
    if not math.isfinite(loss):
        return "loss"
    if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
        return "gradient"
    return None


def too_many_nonfinite(step: int, streak: int, kind: str, lr: float) -> TrainingStopped:
    """The error after ``streak`` non-finite steps in a row, naming the steps and the likely causes."""
    first = step - streak + 1
    return TrainingStopped(
        f"steps {first}-{step}: {streak} steps in a row had a non-finite {kind} (NaN or inf) and were skipped; "
        f"training stopped at step {step}",
        fix=f"likely causes: a learning rate too high (it was {lr:.3g}: lower trainer.learning_rate), fp16 overflow "
        "(set trainer.precision: bf16 or fp32), or bad data in those steps' batches (check the rows, e.g. with "
        "`affinage data check`); raise trainer.max_nonfinite_steps to tolerate more. The newest checkpoint holds the "
        "last good state",
    )
