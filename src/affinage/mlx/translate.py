"""mlx-lm's options as an affinage config mapping: mlx-lm's recipe when the command tunes it, affinage's
defaults when it only names data, model and batch; the options with no honest equivalent refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from affinage.config import DEFAULT_BASE_MODEL
from affinage.errors import ConfigError
from affinage.mlx.flags import flag_name, refuse

# mlx-lm's CONFIG_DEFAULTS that apply when a key is given neither as a flag nor in the -c YAML. Not taken:
# model (Qwen/Qwen3-0.6b: affinage never downloads, its embedded default is used), data (a Hub dataset),
# adapter_path (affinage writes a whole run, to runs/<name>), val_batches/test_batches (caps on how much of a
# split is read: affinage reads the whole split unless asked), grad_checkpoint (affinage's auto: same result).
MLX_DEFAULTS: dict[str, Any] = {
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "learning_rate": 1e-5,
    "steps_per_eval": 200,
    "save_every": 100,
    "max_seq_length": 2048,
    "grad_accumulation_steps": 1,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
}

# The options that tune mlx-lm's recipe: given one, mlx-lm's defaults fill the others (a learning rate of 1e-5
# means something only at mlx-lm's scale of 20). Without them, the run gets affinage's defaults.
RECIPE_KEYS = {
    "num_layers",
    "iters",
    "learning_rate",
    "optimizer",
    "optimizer_config",
    "lora_parameters",
    "lr_schedule",
}
# Without a recipe option, the affinage keys the other options set (everything else keeps the schema's default).
PLAIN_TARGETS = {
    "batch_size": ("trainer", "batch_size"),
    "seed": ("trainer", "seed"),
    "max_seq_length": ("trainer", "max_seq_len"),
    "steps_per_eval": ("trainer", "eval_every"),
    "save_every": ("trainer", "save_every"),
    "grad_accumulation_steps": ("trainer", "gradient_accumulation"),
    "grad_checkpoint": ("trainer", "gradient_checkpointing"),
    "report_to": ("trainer", "report_to"),
    "fine_tune_type": ("adapter", "use_dora"),
}

ADAM_NEUTRAL = {"bias_correction", "weight_decay"}  # optimizer_config keys affinage can honour (see _optimizer)


def translate_mlx(options: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's options (flags over -c YAML) as an affinage config mapping: mlx-lm's defaults fill the rest when
    a recipe option is given (:data:`RECIPE_KEYS`), affinage's otherwise."""
    given, base = dict(options), Path.cwd()  # mlx-lm reads every path from the working directory
    opts = {**MLX_DEFAULTS, **given}
    opts["lora_parameters"] = {**MLX_DEFAULTS["lora_parameters"], **(given.get("lora_parameters") or {})}
    _refusals(opts)
    accumulation = _positive(opts, "grad_accumulation_steps")
    lora = opts["lora_parameters"]
    rank = lora.get("rank", 8)
    adapter: dict[str, Any] = {"r": rank, "alpha": float(lora.get("scale", 20.0)) * rank, "dropout": lora["dropout"]}
    adapter["layers_to_transform"] = _num_layers(opts["num_layers"])
    if lora.get("keys"):
        adapter["target_modules"] = list(lora["keys"])
    if opts["fine_tune_type"] == "dora":
        adapter["use_dora"] = True
    trainer: dict[str, Any] = {
        "max_steps": max(1, _positive(opts, "iters") // accumulation),
        "batch_size": _positive(opts, "batch_size"),
        "gradient_accumulation": accumulation,
        "learning_rate": opts["learning_rate"],
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_grad_norm": None,  # mlx-lm does not clip gradients
        "weight_decay": _optimizer(opts),
        "max_seq_len": _positive(opts, "max_seq_length"),
        "eval_every": max(1, _positive(opts, "steps_per_eval") // accumulation),
        "save_every": max(1, _positive(opts, "save_every") // accumulation),
        "seed": opts["seed"],
    }
    if opts.get("lr_schedule"):
        trainer.update(_schedule(opts["lr_schedule"], trainer["max_steps"]))  # MLX schedules count updates
    if opts.get("grad_checkpoint"):
        trainer["gradient_checkpointing"] = True
    if opts.get("report_to"):
        trainer["report_to"] = _report_to(opts["report_to"])
    raw: dict[str, Any] = {
        "base_model": _model(opts.get("model"), base),
        "adapter": adapter,
        "data": _data(opts.get("data"), base),
        "trainer": trainer,
    }
    if opts.get("trust_remote_code"):
        raw["trust_remote_code"] = True
    test_batches = opts.get("test_batches")
    if test_batches is not None and test_batches != -1:
        raw["eval"] = {"max_examples": _positive(opts, "test_batches") * trainer["batch_size"]}
    raw.update(_features(opts))
    return raw if RECIPE_KEYS & set(given) else _plain(raw, given)


def _plain(raw: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``raw`` keeping, of the adapter and trainer, only what the given options set: affinage's defaults do the rest."""
    kept = {PLAIN_TARGETS[key] for key in given if key in PLAIN_TARGETS}
    for section in ("adapter", "trainer"):
        raw[section] = {key: value for key, value in raw[section].items() if (section, key) in kept}
    return raw


def _positive(opts: dict[str, Any], key: str) -> int:
    value = opts[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive whole number, got {value!r}", where=flag_name(key), fix="e.g. 2")
    return value


def _num_layers(value: Any) -> int | None:
    if value == -1:
        return None
    if not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"--num-layers {value!r}: the number of last blocks to adapt", where="--num-layers", fix="N ≥ 1, or -1: all"
        )
    return value


def _refusals(opts: dict[str, Any]) -> None:
    """The options affinage cannot honour, each refused with what it does and what to use instead."""
    if opts["fine_tune_type"] == "full":
        raise refuse(
            "fine_tune_type",
            "full fine-tuning: every weight of the last blocks trained",
            "use --fine-tune-type lora (or dora), with more --num-layers or a larger rank for more capacity",
        )
    if opts["fine_tune_type"] not in ("lora", "dora"):
        raise ConfigError(f"fine_tune_type {opts['fine_tune_type']!r}", where="--fine-tune-type", fix="lora or dora")
    if opts.get("resume_adapter_file"):
        raise refuse(
            "resume_adapter_file",
            "start training from saved adapter weights",
            "an interrupted affinage run resumes from its checkpoint/ when the same command runs again with the "
            "same --output",
        )
    if opts.get("val_batches") not in (None, -1):
        raise refuse(
            "val_batches",
            "validate on the first N batches of the valid split only",
            "affinage validates on the whole valid split: pass --val-batches -1, or put fewer rows in valid.jsonl",
        )
    if str(opts.get("clear_cache_threshold") or 0).strip() not in ("0", ""):
        raise refuse(
            "clear_cache_threshold", "MLX's Metal allocator cache limit", "remove it: PyTorch manages its own memory"
        )
    if opts.get("project_name"):
        raise refuse("project_name", "the W&B/SwanLab project name", "set the WANDB_PROJECT environment variable")
    if opts.get("hf_dataset"):
        raise refuse(
            "hf_dataset",
            "a Hugging Face dataset loaded by name",
            "download it once as JSONL (train.jsonl, valid.jsonl, test.jsonl in a folder) and pass the folder as data",
        )
    for key in ("chat_feature", "text_feature"):
        if opts.get(key) not in (None, {"chat_feature": "messages", "text_feature": "text"}[key]):
            raise refuse(key, "another column name for chat or raw-text rows", "rename the column in the JSONL rows")
    if "alpha" in opts["lora_parameters"]:
        raise refuse(
            "lora_parameters.alpha",
            "no longer read by mlx-lm: its update is scale·B·A·x",
            "write lora_parameters.scale (affinage's adapter.alpha is scale × rank)",
        )


def _optimizer(opts: dict[str, Any]) -> float:
    """AdamW's weight decay: Adam is AdamW without decay; mlx's AdamW decays by 0.01 unless told."""
    name = str(opts["optimizer"]).lower()
    if name not in ("adam", "adamw"):
        raise refuse(
            "optimizer", f"the {name} optimizer", "use --optimizer adam or adamw (affinage trains with torch's AdamW)"
        )
    settings = dict((opts.get("optimizer_config") or {}).get(name) or {})
    extra = sorted(set(settings) - ADAM_NEUTRAL)
    if extra:
        raise refuse(
            f"optimizer_config.{name}.{extra[0]}",
            "an Adam setting affinage fixes (betas 0.9/0.999, eps 1e-8)",
            f"remove optimizer_config.{name}.{extra[0]}; only weight_decay (adamw) can be set",
        )
    if name == "adam" and settings.get("weight_decay"):
        raise ConfigError("Adam has no weight decay", where="optimizer_config.adam", fix="use optimizer: adamw")
    return float(settings.get("weight_decay", 0.01)) if name == "adamw" else 0.0


def _schedule(schedule: dict[str, Any], updates: int) -> dict[str, Any]:
    """mlx-lm's lr_schedule (an mlx.optimizers scheduler after an optional warm-up from 0) when affinage's
    schedule draws the same curve: cosine or linear decay to 0 over the iterations left after the warm-up."""
    name, arguments = schedule.get("name"), list(schedule.get("arguments") or [])
    warmup = int(schedule.get("warmup", 0) or 0)
    fix = (
        "use lr_schedule {name: cosine_decay, arguments: [LR, ITERS]} or {name: linear_schedule, arguments: "
        "[LR, 0, ITERS]}, optionally with warmup: N (warmup_init 0), or drop it for mlx-lm's constant rate"
    )
    if name == "cosine_decay" and len(arguments) in (2, 3) and (arguments[2:] or [0])[0] == 0:
        kind, steps = "cosine", arguments[1]
    elif name == "linear_schedule" and len(arguments) == 3 and arguments[1] == 0:
        kind, steps = "linear", arguments[2]
    else:
        raise refuse("lr_schedule", f"{name} with arguments {arguments}", fix)
    if schedule.get("warmup_init", 0) or steps not in (updates, updates - warmup) or not 0 <= warmup < updates:
        raise refuse("lr_schedule", f"a {warmup}-step warm-up and a decay over {steps} of {updates} updates", fix)
    return {"learning_rate": arguments[0], "lr_scheduler": kind, "warmup_ratio": warmup / updates}


def _report_to(value: Any) -> list[str]:
    services = [part.strip() for part in str(value).split(",") if part.strip()]
    for service in services:
        if service != "wandb":
            raise refuse("report_to", f"logging to {service}", "use --report-to wandb, or trainer.report_to")
    return services


def _model(model: Any, base: Path) -> str:
    """base_model: the name as given (affinage.models resolves embedded names and their aliases); paths absolute."""
    if not model:
        return DEFAULT_BASE_MODEL  # not mlx-lm's Qwen/Qwen3-0.6b: affinage never downloads a model
    path = (base / str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _data(data: Any, base: Path) -> dict[str, Any]:
    if not data:
        raise ConfigError(
            "no data", where="--data", fix="pass --data DIR (train.jsonl, valid.jsonl, test.jsonl) or --data FILE.jsonl"
        )
    path = (base / str(data)).expanduser()
    if path.is_dir():
        return {"train": str(path.resolve())}
    if path.is_file():
        return {"dataset": str(path.resolve())}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(data)):
        raise refuse(
            f"--data {data}",
            "a Hugging Face dataset loaded by name",
            "download it once as JSONL into a folder (train.jsonl, valid.jsonl, test.jsonl) and pass --data FOLDER",
        )
    raise ConfigError(f"data not found: {path}", where="--data", fix="pass an existing folder or JSONL file")


def _features(opts: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's prompt_feature/completion_feature: the columns of prompt/completion rows."""
    raw: dict[str, Any] = {}
    if opts.get("prompt_feature") not in (None, "prompt") or opts.get("completion_feature") not in (None, "completion"):
        raw["input_features"] = [{"name": opts.get("prompt_feature") or "prompt"}]
        raw["output_features"] = [{"name": opts.get("completion_feature") or "completion"}]
    return raw
