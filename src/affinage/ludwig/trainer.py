"""Ludwig's ``trainer`` block (its LLM ``finetune`` trainer, v0.10 and 0.17) onto affinage's trainer."""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError
from affinage.ludwig.common import OFF, drop_if_off, put, refuse

# Same meaning, another name.
RENAMED = {
    "train_steps": "max_steps",
    "steps_per_checkpoint": "eval_every",  # Ludwig validates and checkpoints every N steps; so does eval_every
    "enable_gradient_checkpointing": "gradient_checkpointing",
}
# Speed or memory knobs whose results affinage reaches its own way: accepted, no effect on what is learned;
# learning_rate_scaling only scales the rate with the number of Ray workers.
SPEED_ONLY = ("eval_batch_size", "max_batch_size", "bucketing_field", "learning_rate_scaling")
# Settings of a feature refused above (or of another model type): they change nothing while it is off.
IGNORED = (
    "regularization_type",
    "profiler",
    "increase_batch_size_on_plateau_patience",
    "increase_batch_size_on_plateau_rate",
    "increase_batch_size_eval_metric",
    "increase_batch_size_eval_split",
    "loss_balancing_alpha",
    "loss_balancing_lr",
    "loss_balancing_preference_vector",
    "loss_balancing_tchebycheff_weight",
    "contrastive_pretrain_temperature",
    "contrastive_pretrain_projection_dim",
    "contrastive_pretrain_learnable_temperature",
    "model_soup_top_k",
)
# Keys that are off at these values (Ludwig's defaults) and refused at any other: key -> what it does.
OFF_ONLY = {
    "checkpoints_per_epoch": "validating N times per epoch (use steps_per_checkpoint / trainer.eval_every)",
    "evaluate_training_set": "scoring the whole training set at every validation",
    "compile": "torch.compile of the model",
    "regularization_lambda": "an L1/L2 penalty on the weights (use optimizer.weight_decay)",
    "increase_batch_size_on_plateau": "growing the batch when the metric plateaus",
    "loss_balancing": "balancing the losses of several outputs",
    "base_learning_rate": "a learning rate scaled with the batch size",
    "layers_to_freeze_regex": "freezing layers by name (LoRA freezes the whole base already)",
    "skip_all_evaluation": "training without any validation",
    "enable_profiling": "the PyTorch profiler",
    "eval_steps": "a cap on validation batches (use eval.max_examples for the test split)",
    "packing_max_sequences_per_pack": "a cap on rows per packed sequence",
    "model_soup": "averaging checkpoints (model soup)",
    "modality_dropout": "dropping input modalities",
    "contrastive_pretrain_epochs": "contrastive pre-training",
}
KEEP_DEFAULT = (
    "regularization_type",
    "profiler",
    "reduce_learning_rate_eval_metric",
    "reduce_learning_rate_eval_split",
)
# config.TrainerConfig's batch_size default (this module sits below the schema; a test keeps them equal).
AFFINAGE_BATCH_SIZE = 8
TRAINER_TYPES = {
    "dpo": "DPO preference training",
    "kto": "KTO preference training",
    "orpo": "ORPO preference training",
    "grpo": "GRPO reinforcement learning",
}


def translate_trainer(raw: dict[str, Any]) -> None:
    """Rename, convert or refuse each Ludwig trainer key; affinage's own keys pass through."""
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        return
    _type(trainer)
    for key in SPEED_ONLY + IGNORED:
        trainer.pop(key, None)
    if trainer.get("steps_per_checkpoint") in (0, None):
        trainer.pop("steps_per_checkpoint", None)  # Ludwig's 0: once per epoch, affinage's eval_every null
    for key, target in RENAMED.items():
        if key in trainer:
            put(raw, f"trainer.{target}", trainer.pop(key), f"trainer.{key}")
    fix = "remove it (or set it to Ludwig's default, off)"
    drop_if_off(trainer, "trainer", OFF_ONLY, fix, off=(*OFF, -1, "auto"))
    if trainer.pop("should_shuffle", True) is False:
        raise refuse("trainer.should_shuffle: false", "training on the rows in file order", "remove it")
    if trainer.get("learning_rate") == "auto":
        raise refuse(
            "trainer.learning_rate: auto",
            "a learning-rate range test before training",
            "give a number, or remove it for affinage's 2e-4 (a good LoRA rate; see docs/ludwig.md#defaults)",
        )
    for key in ("batch_size", "gradient_accumulation_steps", "gradient_accumulation"):
        if trainer.get(key) == "auto":
            trainer.pop(key)  # affinage's default; its token budget (max_tokens_per_forward: auto) fits memory
    if "early_stop" in trainer:
        patience = trainer.pop("early_stop")
        put(raw, "trainer.early_stopping_patience", None if patience in (None, -1) else patience, "trainer.early_stop")
    if "use_mixed_precision" in trainer:
        # Ludwig's mixed precision is fp16 autocast on a GPU; affinage's auto is bf16 where fast, else fp32.
        put(
            raw,
            "trainer.precision",
            "auto" if trainer.pop("use_mixed_precision") else "fp32",
            "trainer.use_mixed_precision",
        )
    _effective_batch_size(raw, trainer)
    _validation(raw, trainer)
    _optimizer(trainer)
    _clipping(raw, trainer)
    _scheduler(trainer)


def _type(trainer: dict[str, Any]) -> None:
    kind = trainer.get("type", "finetune")
    kind = "none" if kind is None else str(kind).lower()
    if kind in TRAINER_TYPES:
        fix = "use trainer.type: finetune (supervised fine-tuning on prompt/completion pairs)"
        raise refuse(f"trainer.type: {kind}", TRAINER_TYPES[kind], fix)
    trainer["type"] = kind  # finetune, or none: affinage train evaluates the base model without training


def _effective_batch_size(raw: dict[str, Any], trainer: dict[str, Any]) -> None:
    """Ludwig's examples per optimizer step -> affinage's micro-batches to accumulate."""
    effective = trainer.pop("effective_batch_size", "auto")
    if effective in (None, "auto"):
        return
    batch = trainer.get("batch_size", AFFINAGE_BATCH_SIZE)
    if not isinstance(effective, int) or effective % batch:
        raise ConfigError(
            f"trainer.effective_batch_size {effective} is not a multiple of trainer.batch_size {batch}",
            where="trainer.effective_batch_size",
            fix="make it a multiple of batch_size (affinage accumulates effective / batch micro-batches)",
        )
    put(raw, "trainer.gradient_accumulation_steps", effective // batch, "trainer.effective_batch_size")


def _validation(raw: dict[str, Any], trainer: dict[str, Any]) -> None:
    """``validation_metric`` picks the best checkpoint: the loss, or the eval task's metric."""
    trainer.pop("validation_field", None)  # one output feature (or "combined"): the same thing in affinage
    metric = trainer.pop("validation_metric", None)
    if metric in (None, "loss"):
        return
    if metric == "accuracy":
        put(raw, "trainer.best_metric", "task", "trainer.validation_metric")
        return
    raise refuse(
        f"trainer.validation_metric: {metric}",
        "another metric picking the best checkpoint",
        "use loss (affinage's valid_loss) or accuracy (the eval task's metric: trainer.best_metric: task)",
    )


OPTIMIZERS = ("adamw", "adam")


def _optimizer(trainer: dict[str, Any]) -> None:
    """AdamW is affinage's optimizer; Ludwig's ``adam`` (its default) is AdamW without weight decay."""
    optimizer = trainer.pop("optimizer", None)
    if not isinstance(optimizer, dict):
        return
    optimizer = dict(optimizer)
    kind = str(optimizer.pop("type", "adam")).lower()
    decay = optimizer.pop("weight_decay", 0.0) or 0.0
    if kind not in OPTIMIZERS or (kind == "adam" and decay):
        what = "Adam with an L2 penalty" if kind == "adam" else f"the {kind} optimizer"
        raise refuse(
            f"trainer.optimizer.type: {kind}", what, "use optimizer.type: adamw (with weight_decay if you want it)"
        )
    if decay:
        trainer["weight_decay"] = decay
    defaults = {"betas": ((0.9, 0.999), [0.9, 0.999]), "eps": (1e-8,), "amsgrad": (False,)}
    for key, value in optimizer.items():
        if value not in defaults.get(key, ()):
            raise refuse(
                f"trainer.optimizer.{key}: {value}",
                "an optimizer setting other than AdamW's defaults",
                "remove it: affinage's AdamW uses betas (0.9, 0.999), eps 1e-8",
            )


def _clipping(raw: dict[str, Any], trainer: dict[str, Any]) -> None:
    clipping = trainer.pop("gradient_clipping", None)
    if not isinstance(clipping, dict):
        return
    clipping = dict(clipping)
    if "clipglobalnorm" in clipping:
        put(raw, "trainer.max_grad_norm", clipping.pop("clipglobalnorm"), "trainer.gradient_clipping.clipglobalnorm")
    fix = "use gradient_clipping.clipglobalnorm (affinage's trainer.max_grad_norm)"
    drop_if_off(
        clipping,
        "trainer.gradient_clipping",
        {"clipnorm": "clipping each gradient's norm", "clipvalue": "clipping gradient values"},
        fix,
        off=(None,),
    )


SCHEDULER_OFF = {
    "reduce_on_plateau": "lowering the learning rate on a plateau",
    "warmup_evaluations": "warm-up counted in validations (use warmup_fraction)",
    "t_0": "cosine decay with restarts",
    "eta_min": "a floor under the cosine decay",
}
# Parameters of a schedule that is refused (exponential, one-cycle, inverse sqrt, polynomial, WSD) or of the
# plateau reduction: they change nothing under cosine, linear or constant decay.
SCHEDULER_IGNORED = (
    "decay_rate",
    "decay_steps",
    "staircase",
    "max_lr",
    "inverse_sqrt_warmup_steps",
    "wsd_warmup_fraction",
    "reduce_on_plateau_patience",
    "reduce_on_plateau_rate",
    "reduce_eval_metric",
    "reduce_eval_split",
    "t_mult",
    "pct_start",
    "div_factor",
    "final_div_factor",
    "polynomial_power",
    "polynomial_end_lr",
    "wsd_stable_fraction",
    "wsd_decay_fraction",
)


def _scheduler(trainer: dict[str, Any]) -> None:
    """Ludwig's block: ``decay`` null is a constant rate after warm-up (Ludwig's default), not affinage's cosine."""
    scheduler = trainer.get("learning_rate_scheduler")
    if not isinstance(scheduler, dict):
        return
    scheduler = trainer["learning_rate_scheduler"] = dict(scheduler)
    fix = "use decay cosine, linear or null with warmup_fraction"
    drop_if_off(scheduler, "trainer.learning_rate_scheduler", SCHEDULER_OFF, fix)
    for key in SCHEDULER_IGNORED:
        scheduler.pop(key, None)
    decay = scheduler.get("decay")
    if decay in (None, "none", "constant"):
        scheduler["decay"] = "constant"
    elif decay not in ("cosine", "linear"):
        raise refuse(f"trainer.learning_rate_scheduler.decay: {decay}", f"{decay} learning-rate decay", fix)
