"""The training recipe: wires the plan, the state, the listeners and the loop for one run.

:func:`fine_tune` takes every path it writes as an argument; :func:`train` is the older
entry point that derives them from a run directory (``DIR/adapter``, ``DIR/checkpoint/step-NNNNNN/``,
``DIR/metrics.jsonl``, ``DIR/tensorboard``), which :mod:`affinage.pipeline` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from affinage import distributed
from affinage.config import TrainerConfig
from affinage.data.template import Encoded
from affinage.errors import AffinageError
from affinage.lora.layers import mark_only_lora_as_trainable
from affinage.models import base_model_hub_id
from affinage.runtime import peak_rss_mb
from affinage.training import checkpoint
from affinage.training.listeners import (
    BestAdapter,
    Checkpointer,
    EarlyStopping,
    HeapTrim,
    History,
    MetricsLog,
    ProgressBar,
)
from affinage.training.loop import Listener, StepOptions, Validate, run_steps
from affinage.training.losses import CPU, LossFn, evaluate_loss
from affinage.training.plan import BatchPlan
from affinage.training.reporting import reporters
from affinage.training.schedule import lr_schedule
from affinage.training.sharding import shard_model
from affinage.training.state import TrainState

TaskScore = Callable[[nn.Module], float]


@dataclass
class TrainResult:
    steps: int
    train_tokens: int
    train_seconds: float
    train_tokens_per_second: float
    peak_memory_mb: float
    final_train_loss: float | None
    best_valid_loss: float | None
    best_step: int | None
    best_valid_score: float | None = None
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    packed: bool = False
    frozen_prefix_cached: bool = False
    truncated: int = 0
    history: list[dict] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def lora_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW on the LoRA factors only (everything else frozen), fused where torch fuses it for every factor.

    Why fused: on CPU torch's default is a Python loop of ~10 operators per tensor; SmolLM2's 420
    factors took 38.6 ms a step that way and 8.9 ms fused (2-vCPU Xeon). Same update, to rounding."""
    mark_only_lora_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(fusable(p) for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused or None
    )


def fusable(param: torch.Tensor) -> bool:
    """Whether torch's fused AdamW takes ``param``: a plain (not sharded) floating tensor on CPU or CUDA."""
    return param.device.type in ("cpu", "cuda") and param.is_floating_point() and not isinstance(param, DTensor)


def validation(plan: BatchPlan, device: torch.device, task_score: TaskScore | None = None) -> Validate | None:
    """The loop's validation: loss on the plan's validation split, and ``task_score`` when given."""
    if not plan.valid_data:
        return None

    def validate(model: nn.Module) -> dict[str, float]:
        loss = evaluate_loss(
            model, plan.valid_data, plan.batch_size, plan.pad_id, device, plan.valid_loss_fn, plan.pad_multiple
        )
        result = {"valid_loss": loss}
        if task_score is not None:
            result["valid_score"] = round(task_score(model), 4)  # compared at the precision it is reported
            model.train()
        return result

    return validate


def run_plan(
    model: nn.Module,
    plan: BatchPlan,
    optimizer: torch.optim.Optimizer,
    cfg: TrainerConfig,
    *,
    state: TrainState | None = None,
    listeners: Sequence[Listener] = (),
    device: torch.device = CPU,
    validate: Validate | None = None,
) -> TrainState:
    """The loop over ``plan``'s batches with ``cfg``'s schedule, from ``state`` (a resumed run's) on."""
    state = state or TrainState()
    options = StepOptions(
        accumulation=cfg.gradient_accumulation,
        max_grad_norm=cfg.max_grad_norm,
        forward_budget=plan.forward_budget,
        pad_multiple=plan.pad_multiple,
        recompute_above=plan.recompute_above,
        device=device,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
    )
    return run_steps(
        model,
        plan.batches(skip=state.batches),
        plan.train_loss_fn,
        optimizer,
        steps=plan.total_steps,
        lr_at=lr_schedule(cfg, plan.total_steps),
        state=state,
        options=options,
        validate=validate,
        eval_every=plan.eval_every,
        listeners=listeners,
    )


@dataclass(frozen=True)
class TrainPaths:
    """Where a training run's outputs go; a run directory lays them out with :meth:`under`."""

    adapter_dir: Path
    checkpoint_dir: Path | None = None  # numbered resume checkpoints; None: none written
    metrics_path: Path | None = None  # None: no metrics.jsonl
    tensorboard_dir: Path | None = None

    @classmethod
    def under(cls, directory: str | Path) -> TrainPaths:
        directory = Path(directory)
        return cls(
            adapter_dir=directory / "adapter",
            checkpoint_dir=directory / "checkpoint",
            metrics_path=directory / "metrics.jsonl",
            tensorboard_dir=directory / "tensorboard",
        )


def fine_tune(
    model: nn.Module,
    train_data: Sequence[Encoded],
    valid_data: Sequence[Encoded],
    cfg: TrainerConfig,
    *,
    pad_id: int,
    paths: TrainPaths,
    base_model_name: str,
    adapter_dropout: float = 0.0,
    device: torch.device = CPU,
    loss_fn: LossFn | None = None,
    resume: bool = True,
    progress: bool = True,
    task_score: TaskScore | None = None,
    listeners: Sequence[Listener] = (),
) -> TrainResult:
    """Fine-tune the LoRA factors of ``model``; the best adapter goes to ``paths.adapter_dir``.

    The best adapter is the one with the lowest validation loss, or with
    ``cfg.best_metric == "task"`` the highest ``task_score(model)`` (accuracy, chrF, pattern
    score on the validation split). ``cfg.early_stopping_patience`` validations without
    improvement end the run. With ``paths.checkpoint_dir`` a checkpoint is written every
    ``cfg.save_every`` steps, after each validation and on SIGTERM/SIGINT; with ``resume`` a killed
    run goes on exactly where the newest complete one stopped. A path left ``None`` writes nothing there.
    ``listeners`` are told about the run after the recipe's own (a benchmark's probes, a caller's logger).
    """
    torch.manual_seed(cfg.seed + distributed.rank())  # under torchrun each process draws its own dropout masks
    mark_only_lora_as_trainable(model)
    distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # one start for all
    if cfg.distributed == "fsdp" and distributed.active():
        shard_model(model, device)
    optimizer = lora_optimizer(model, cfg)
    plan = BatchPlan.build(model, train_data, valid_data, cfg, pad_id=pad_id, device=device, loss_fn=loss_fn)
    # Restored after the plan is built. The frozen-prefix pass, inside the steps, draws nothing from the RNG
    # (its blocks run without dropout), so a resumed run's windows, computed at other steps, change no draw.
    saved = _newest_checkpoint(paths.checkpoint_dir) if resume else None
    state = _resume(saved, plan, model, optimizer) if saved else TrainState()
    history = History()
    adapter = BestAdapter(
        model,
        paths.adapter_dir if distributed.is_main() else None,
        base_model_id=base_model_hub_id(base_model_name),
        dropout=adapter_dropout,
        by_score=cfg.best_metric == "task" and task_score is not None,
    )
    listeners = [adapter, history, *_listeners(model, optimizer, plan, cfg, paths, progress, device), *listeners]
    validate = validation(plan, device, task_score)
    state = run_plan(model, plan, optimizer, cfg, state=state, listeners=listeners, device=device, validate=validate)
    return _result(state, plan, history, device)


def _listeners(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: BatchPlan,
    cfg: TrainerConfig,
    paths: TrainPaths,
    progress: bool,
    device: torch.device = CPU,
) -> list[Listener]:
    """The listeners after :class:`BestAdapter` and :class:`History`. Only rank 0 writes files or draws the bar;
    every process keeps the counts (early stopping must stop them all) and takes part in checkpoints."""
    main = distributed.is_main()
    checkpoints = paths.checkpoint_dir is not None
    return [
        *([MetricsLog(paths.metrics_path)] if main and paths.metrics_path is not None else []),
        *(
            [
                Checkpointer(
                    paths.checkpoint_dir,
                    model,
                    optimizer,
                    plan.cursor,
                    every=cfg.save_every,
                    keep=cfg.keep_checkpoints,
                    write=main,
                )
            ]
            if checkpoints
            else []
        ),
        EarlyStopping(cfg.early_stopping_patience),
        *(
            reporters(cfg.report_to, tensorboard_dir=paths.tensorboard_dir, config=cfg.model_dump(mode="json"))
            if main
            else []
        ),
        *([ProgressBar(plan.total_steps)] if progress and main else []),
        *([HeapTrim(every=10)] if device.type == "cpu" else []),  # CUDA memory is not the C heap
    ]


def _newest_checkpoint(root: Path | None) -> checkpoint.Checkpoint | None:
    """The newest complete checkpoint under ``root``, read by rank 0 and sent to every process (no shared disk)."""
    if root is None:
        return None
    newest = checkpoint.latest(Path(root)) if distributed.is_main() else None
    return distributed.broadcast({"path": str(newest), **checkpoint.load(newest)} if newest else None)


def _resume(
    saved: checkpoint.Checkpoint, plan: BatchPlan, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainState:
    """The checkpoint ``saved`` restored, once its data cursor is known to fit this run's batch order."""
    path = saved["path"]
    cursor = saved["cursor"]
    if plan.cursor(cursor["batches"]) != cursor:  # another number of examples: other batches per epoch
        raise AffinageError(
            f"{path} was written for a training split of another size (epoch {cursor['epoch']}, batch "
            f"{cursor['position']} does not fall where {plan.batches_per_epoch} batches per epoch put it): the data "
            "changed since the run was interrupted",
            fix="restore the data the run started with, or pass --overwrite to train again from the start",
        )
    return checkpoint.restore(saved, model, optimizer)


def _result(state: TrainState, plan: BatchPlan, history: History, device: torch.device) -> TrainResult:
    return TrainResult(
        steps=state.step,
        train_tokens=state.tokens,
        train_seconds=round(state.seconds, 2),
        train_tokens_per_second=round(state.tokens / max(state.seconds, 1e-9), 1),
        peak_memory_mb=round(peak_memory_mb(device), 1),
        final_train_loss=history.last_loss,
        best_valid_loss=state.best_loss,
        best_step=state.best_step,
        best_valid_score=state.best_score,
        nonfinite_steps=state.nonfinite_steps,
        packed=plan.packed,
        frozen_prefix_cached=plan.prefix_cached,
        history=history.records,
    )


def train(
    model: nn.Module,
    train_data: Sequence[Encoded],
    valid_data: Sequence[Encoded],
    cfg: TrainerConfig,
    *,
    run_dir: Path,
    **options: Any,
) -> TrainResult:
    """:func:`fine_tune` (same keyword options) with its outputs laid out under ``run_dir``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return fine_tune(model, train_data, valid_data, cfg, paths=TrainPaths.under(run_dir), **options)
