"""Training, in rooms: the schedule, the plan (batches, losses, step counts), the state a checkpoint
holds, the loop, its listeners, and the recipe that wires them.

    schedule   get_lr, lr_schedule                  pure functions of the step
    losses     causal_lm_loss, evaluate_loss, ...   a batch's summed loss and labelled-token count
    head_loss  head_cross_entropy                   the head + cross-entropy at labels, chunked over the vocabulary
    plan       BatchPlan                            packing / frozen-prefix cache / token budget, the batch stream
    state      TrainState                           counters, best validation, non-finite counts, metrics (JSON)
    checkpoint capture, save, load, restore, latest     numbered resume checkpoints: safetensors + JSON, atomic
    faults     StopRequests, nonfinite               SIGTERM/SIGINT and non-finite steps
    loop       run_steps, Listener, StepReport      the steps; no file, no progress bar
    listeners  MetricsLog, ProgressBar, BestAdapter, EarlyStopping, Checkpointer, History
    reporting  TensorBoard, WandB, MLflow           trainer.report_to
    recipe     fine_tune, train, TrainResult        one run wired from its config and its paths
"""

from affinage.training import checkpoint
from affinage.training.listeners import BestAdapter, Checkpointer, EarlyStopping, History, MetricsLog, ProgressBar
from affinage.training.loop import Listener, StepOptions, StepReport, activation_checkpointing, run_steps, train_step
from affinage.training.losses import LossFn, causal_lm_loss, evaluate_loss, full_logits_loss, model_inputs
from affinage.training.plan import BatchPlan, resolve_forward_budget
from affinage.training.recipe import (
    TrainPaths,
    TrainResult,
    fine_tune,
    lora_optimizer,
    peak_memory_mb,
    run_plan,
    train,
    validation,
)
from affinage.training.reporting import MLflow, TensorBoard, WandB, reporters
from affinage.training.schedule import get_lr, lr_schedule
from affinage.training.state import TrainState

__all__ = [
    "BatchPlan",
    "checkpoint",
    "BestAdapter",
    "Checkpointer",
    "EarlyStopping",
    "History",
    "Listener",
    "LossFn",
    "MLflow",
    "MetricsLog",
    "ProgressBar",
    "StepOptions",
    "StepReport",
    "TensorBoard",
    "TrainResult",
    "TrainState",
    "WandB",
    "activation_checkpointing",
    "causal_lm_loss",
    "evaluate_loss",
    "fine_tune",
    "TrainPaths",
    "full_logits_loss",
    "get_lr",
    "lora_optimizer",
    "lr_schedule",
    "model_inputs",
    "peak_memory_mb",
    "reporters",
    "resolve_forward_budget",
    "run_plan",
    "run_steps",
    "train",
    "train_step",
    "validation",
]
