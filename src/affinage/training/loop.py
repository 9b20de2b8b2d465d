"""The training loop itself: steps, nothing else (mlx-lm's shape).

It takes the model, a batch stream, a loss function and an optimizer, and for each optimizer
step runs its micro-batches forward and backward, clips, steps, then tells its listeners.
Gradient accumulation normalises by the labelled tokens of the whole step, so every token weighs
the same. It writes no file and draws nothing: metrics, progress bars, checkpoints and the best
adapter are listeners (:mod:`affinage.training.listeners`) the recipe wires in. A step with a
non-finite loss or gradient is skipped (no update) and counted; a SIGTERM/SIGINT ends the run
after its step, once the listeners have checkpointed it (:mod:`affinage.training.faults`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from affinage import distributed
from affinage.data.batching import split_rows
from affinage.runtime import frozen_objects
from affinage.training.block_attention import blockwise_causal_attention
from affinage.training.faults import StopRequests, nonfinite, too_many_nonfinite
from affinage.training.gated_mlp import recompute_gated_activations
from affinage.training.losses import CPU, LossFn, to_device
from affinage.training.rms_norm import fused_rms_norms
from affinage.training.state import TrainState

Validate = Callable[[nn.Module], dict[str, float]]  # {"valid_loss": ..., optionally "valid_score": ...}


@dataclass
class StepReport:
    """One optimizer step, unrounded: what listeners log and draw."""

    step: int
    epoch: int
    loss: float  # mean per labelled token
    lr: float
    tokens: int  # real (non-padding) tokens
    seconds: float
    grad_norm: float | None = None
    skipped: str | None = None  # "loss" or "gradient": it was not finite, the step made no update

    def record(self) -> dict:
        """The step's metrics.jsonl line (a skipped step's loss is null: JSON has no NaN)."""
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": None if self.skipped else round(self.loss, 5),
            "lr": self.lr,
            "tokens_per_second": round(self.tokens / self.seconds, 1),
        }
        if self.grad_norm is not None and not self.skipped:
            record["grad_norm"] = round(self.grad_norm, 4)
        if self.skipped:
            record["skipped"] = f"non-finite {self.skipped}"
        return record


class Listener:
    """Told about the run as it goes; every hook is optional. Listeners run in the order given."""

    def on_start(self, state: TrainState) -> None: ...

    def on_step(self, state: TrainState, report: StepReport) -> None:
        """After the optimizer step, before any validation."""

    def on_validation(self, state: TrainState, evaluation: dict) -> None:
        """``evaluation`` is {"step", "epoch", "valid_loss", ...}; a listener may add to it for the next ones."""

    def should_stop(self, state: TrainState) -> bool:
        return False

    def on_early_stop(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, report: StepReport) -> None:
        """After the step and its validation (not after the step that stopped the run early)."""

    def on_end(self, state: TrainState) -> None:
        """When the loop finishes normally (not when it raises)."""

    def on_interrupt(self, state: TrainState) -> None:
        """A signal stops the run after this step: the last chance to checkpoint it."""


def recomputes(batch: dict, above: int | None) -> bool:
    """Whether this forward recomputes its blocks in backward: more tokens than ``above`` (None: never;
    :mod:`~affinage.training.recompute_policy` decides it)."""
    return above is not None and batch["input_ids"].numel() > above


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """transformers' per-block checkpointing (non-reentrant: RNG state and dropout masks replay) while training."""
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


@dataclass
class StepOptions:
    """How one optimizer step runs."""

    accumulation: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None: no clipping
    forward_budget: int | None = None  # tokens per forward pass; a bigger micro-batch runs as several
    pad_multiple: int = 1  # a split micro-batch's row groups keep widths that are multiples of this
    recompute_above: int | None = None  # a forward with more tokens recomputes its blocks (0: all; None: none)
    device: torch.device = CPU
    max_nonfinite_steps: int | None = 10  # stop after this many skipped steps in a row (None: never)


@contextmanager
def training_forms(model: nn.Module, blockwise_attention: bool = True) -> Iterator[None]:
    """The forms a training forward takes that inference does not: gated MLPs keep gate and up for
    backward, not also act(gate) (same gradients, less memory); RMSNorms run a fused backward
    (:mod:`~affinage.training.rms_norm`); causal attention on CPU skips the scores above the
    diagonal (:mod:`~affinage.training.block_attention`)."""
    attention = blockwise_causal_attention(model) if blockwise_attention else nullcontext()
    with recompute_gated_activations(model), fused_rms_norms(model), attention:
        yield


def train_step(
    model: nn.Module,
    batches: Iterator[tuple[int, dict]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    lr: float,
    options: StepOptions,
) -> StepReport:
    """One optimizer step over ``options.accumulation`` micro-batches; ``step`` is left at 0 for the caller."""
    started = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = [next(batches) for _ in range(options.accumulation)]
    # A micro-batch over the token budget runs as several forwards: same gradient, lower peak.
    # (Under torchrun a micro-batch is this process's share of the global one; it may be empty.)
    budget = options.forward_budget
    chunks = [
        to_device(c, options.device)
        for _, batch in micro
        if batch
        for c in split_rows(batch, budget, options.pad_multiple)
    ]
    # Normalise by the labelled tokens of the whole step, summed over all processes, so every token
    # weighs the same and N processes compute the one-process gradient.
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in chunks)
    step_tokens = int(distributed.sum_values(labelled)[0])
    step_loss = 0.0
    for batch in chunks:
        with activation_checkpointing(model, recomputes(batch, options.recompute_above)):
            loss_sum, _ = loss_fn(model, batch)
            (loss_sum / max(step_tokens, 1)).backward()
        step_loss += float(loss_sum.detach())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in chunks)
    # One all_reduce: gradients, loss and tokens of every process (a NaN anywhere reaches all: all skip).
    step_loss, real_tokens = distributed.reduce_gradients(params, step_loss, real_tokens)
    skipped = _nonfinite_anywhere(step_loss, params)
    grad_norm = None
    if skipped is None:  # a NaN would poison AdamW's moments for good: no update at all
        if options.max_grad_norm:
            grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return StepReport(
        step=0,
        epoch=micro[-1][0],
        loss=step_loss / max(step_tokens, 1),
        lr=lr,
        tokens=int(real_tokens),
        seconds=seconds,
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped=skipped,
    )


def _nonfinite_anywhere(loss: float, params: list[torch.Tensor]) -> str | None:
    """:func:`nonfinite` agreed by every process. Summed gradients agree already; a sharded model's (FSDP)
    are pieces, so a NaN in one process's piece is shared with a vote."""
    grads = [p.grad for p in params if p.grad is not None]
    pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    found = nonfinite(loss, pieces)
    if any(isinstance(g, DTensor) for g in grads) and distributed.any_rank(found is not None):
        return found or "gradient"
    return found


def run_steps(
    model: nn.Module,
    batches: Iterator[tuple[int, dict]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    lr_at: Callable[[int], float],
    state: TrainState | None = None,
    options: StepOptions | None = None,
    validate: Validate | None = None,
    eval_every: int | None = None,
    listeners: Sequence[Listener] = (),
) -> TrainState:
    """Train until ``state.step == steps`` (or a listener stops the run); validate every ``eval_every`` steps
    and at the last one. ``batches`` must already stand at ``state.batches``.

    Raises :class:`~affinage.errors.TrainingStopped` after a SIGTERM/SIGINT (once ``on_interrupt``
    has let the listeners checkpoint) or after ``options.max_nonfinite_steps`` skipped steps in a row.
    """
    state = state or TrainState()
    options = options or StepOptions()
    for listener in listeners:
        listener.on_start(state)
    stopped = any(listener.should_stop(state) for listener in listeners)  # it had stopped before a kill
    model.train()
    with training_forms(model), StopRequests() as stop, frozen_objects():
        while state.step < steps and not stopped:
            report = train_step(model, batches, loss_fn, optimizer, lr_at(state.step), options)
            state.step += 1
            state.batches += options.accumulation
            state.tokens += report.tokens
            state.seconds += report.seconds
            report.step = state.step
            _count_nonfinite(state, report)
            for listener in listeners:
                listener.on_step(state, report)
            limit = options.max_nonfinite_steps
            if report.skipped and limit and state.nonfinite_streak >= limit:
                raise too_many_nonfinite(state.step, state.nonfinite_streak, report.skipped, report.lr)
            if validate is not None and (state.step % (eval_every or steps) == 0 or state.step == steps):
                evaluation = {"step": state.step, "epoch": report.epoch, **validate(model)}
                for listener in listeners:
                    listener.on_validation(state, evaluation)
            if stopped := any(listener.should_stop(state) for listener in listeners):  # after every step: a
                for listener in listeners:  # probe may stop the run between validations (early stopping at them)
                    listener.on_early_stop(state)
                break
            for listener in listeners:
                listener.on_step_end(state, report)
            if distributed.any_rank(stop.requested):  # the step is done on every process: checkpoint it, leave
                for listener in listeners:
                    listener.on_interrupt(state)
                raise stop.error(state.step, steps)
    for listener in listeners:
        listener.on_end(state)
    return state


def _count_nonfinite(state: TrainState, report: StepReport) -> None:
    """Skipped steps in all and in a row (a finite step resets the streak)."""
    if report.skipped:
        state.nonfinite_steps += 1
        state.nonfinite_streak += 1
    else:
        state.nonfinite_streak = 0
