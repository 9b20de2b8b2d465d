"""mlx-lm's way of asking for a run: ``mlx_lm.lora``'s flags and its ``-c`` YAML, as an affinage config.

Seed 003 trains with ``mlx_lm.lora --train --model M --data data --batch-size 2`` and no config
file; ``affinage train --train --model M --data data --batch-size 2`` takes the same command. The
names are mlx-lm's (``mlx_lm/lora.py``: its argparse and ``CONFIG_DEFAULTS``, ``mlx_lm/tuner``).
A command that tunes mlx-lm's recipe (``--iters``, ``--learning-rate``, ``--num-layers``,
``--optimizer``, or the -c YAML's ``lora_parameters``/``lr_schedule``) gets the rest of mlx-lm's
recipe with it (rank 8, scale 20, the last 16 blocks, Adam at a constant 1e-5, 1000 iterations of
batch 4, no clipping): its numbers were chosen against those. A command that only says which data,
model and batch (seed 003's) gets affinage's defaults, the schema's, tuned for the CPU. A flag or
key with no honest equivalent is refused, saying what it does in mlx-lm and what to use instead.
Like ``ludwig``, this sits beside the schema and knows nothing above it.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from affinage.config import (
    DEFAULT_BASE_MODEL,
    Config,
    _read_yaml,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from affinage.errors import ConfigError

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

# (flag, key, argparse options, help): mlx_lm.lora's command line. `-c/--config` is added apart.
FLAGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("--model", "model", {}, "base model: an embedded name, a local folder or a cached Hub id (→ base_model)"),
    ("--train", "train", {"action": "store_true", "default": None}, "accepted: `affinage train` trains"),
    ("--data", "data", {}, "a folder with train/valid/test.jsonl, or one JSONL file to split (→ data.train/dataset)"),
    ("--fine-tune-type", "fine_tune_type", {"choices": ["lora", "dora", "full"]}, "lora, or dora (full: refused)"),
    ("--optimizer", "optimizer", {"choices": ["adam", "adamw", "muon", "sgd", "adafactor"]}, "adam or adamw"),
    ("--mask-prompt", "mask_prompt", {"action": "store_true", "default": None}, "accepted: affinage always masks"),
    ("--num-layers", "num_layers", {"type": int}, "LoRA on the last N blocks, -1: all (mlx-lm default 16)"),
    ("--batch-size", "batch_size", {"type": int}, "examples per batch (mlx-lm default 4)"),
    ("--iters", "iters", {"type": int}, "training iterations (mlx-lm default 1000) (→ trainer.max_steps)"),
    ("--val-batches", "val_batches", {"type": int}, "-1 only: affinage validates on the whole valid split"),
    ("--learning-rate", "learning_rate", {"type": float}, "constant learning rate (mlx-lm default 1e-5)"),
    ("--steps-per-report", "steps_per_report", {"type": int}, "accepted: affinage logs every step"),
    ("--steps-per-eval", "steps_per_eval", {"type": int}, "validate every N iterations (→ trainer.eval_every)"),
    ("--grad-accumulation-steps", "grad_accumulation_steps", {"type": int}, "iterations per optimizer update"),
    ("--resume-adapter-file", "resume_adapter_file", {}, "refused: rerun the same command to resume"),
    ("--adapter-path", "adapter_path", {}, "the run directory (same as --output); the adapter is DIR/adapter/"),
    ("--save-every", "save_every", {"type": int}, "checkpoint every N iterations (→ trainer.save_every)"),
    ("--test", "test", {"action": "store_true", "default": None}, "accepted: affinage always evaluates the test split"),
    ("--test-batches", "test_batches", {"type": int}, "evaluate on N batches of test rows, -1: all"),
    ("--max-seq-length", "max_seq_length", {"type": int}, "truncate longer examples (→ trainer.max_seq_len)"),
    ("--grad-checkpoint", "grad_checkpoint", {"action": "store_true", "default": None}, "gradient checkpointing"),
    ("--clear-cache-threshold", "clear_cache_threshold", {}, "MLX's allocator setting: refused unless 0"),
    ("--report-to", "report_to", {}, "wandb (swanlab: refused) (→ trainer.report_to)"),
    ("--project-name", "project_name", {}, "refused: set WANDB_PROJECT"),
    ("--seed", "seed", {"type": int}, "seed of shuffling, dropout and initialisation (mlx-lm default 0)"),
    ("--trust-remote-code", "trust_remote_code", {"action": "store_true", "default": None}, "run model code"),
]
KEYS = {key for _, key, _, _ in FLAGS}
# keys of mlx-lm's -c YAML besides the flags' (`lora_layers` is num_layers' old name)
YAML_ONLY = {"lora_parameters", "lr_schedule", "optimizer_config", "hf_dataset", "lora_layers", "config"}
FEATURE_KEYS = {"prompt_feature", "completion_feature", "chat_feature", "text_feature"}
ADAM_NEUTRAL = {"bias_correction", "weight_decay"}  # optimizer_config keys affinage can honour (see _optimizer)


def refuse(key: str, what: str, fix: str) -> ConfigError:
    """mlx-lm's option (a flag's name for what has one, else the YAML key) refused, saying why and what instead."""
    flag = _flag(key) if key in KEYS else key
    return ConfigError(f"mlx-lm's `{flag}` ({what}) is not supported by affinage", where=flag, fix=fix)


def add_mlx_flags(parser: argparse.ArgumentParser) -> None:
    """mlx_lm.lora's flags on ``affinage train`` (stored as ``mlx_<key>``; None when not given)."""
    group = parser.add_argument_group("mlx-lm's flags (instead of CONFIG; see docs/mlx-lm.md)")
    group.add_argument(
        "-c", "--config", dest="mlx_config", metavar="FILE", help="mlx-lm's YAML config (lora_config.yaml)"
    )
    for flag, key, options, text in FLAGS:
        metavar = {} if options.get("action") else {"metavar": key.upper()}
        group.add_argument(flag, dest=f"mlx_{key}", help=text, **metavar, **options)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """mlx-lm's keys set on the command line."""
    return {key: getattr(args, f"mlx_{key}") for key in KEYS if getattr(args, f"mlx_{key}", None) is not None}


def train_config(args: argparse.Namespace, *, echo: bool = True) -> tuple[Config, Path]:
    """The config and run directory of ``affinage train``: from CONFIG, or from mlx-lm's flags / -c YAML."""
    flags = given_flags(args)
    if args.config and Path(args.config).is_dir() and "data" not in flags:  # `affinage train data/`, as data check
        flags["data"], args.config = args.config, None
    if args.config and (flags or args.mlx_config):
        raise ConfigError(
            "a CONFIG file and mlx-lm's flags together",
            where=", ".join(["-c"] * bool(args.mlx_config) + [f"--{k.replace('_', '-')}" for k in sorted(flags)]),
            fix="use one: the CONFIG file (override keys with --set, e.g. --set trainer.batch_size=2), or only "
            "mlx-lm's flags",
        )
    if args.config:
        if not args.output:
            raise ConfigError("no run directory", where="--output", fix="pass --output DIR (e.g. runs/my-run)")
        return load_config(args.config, args.set), Path(args.output)
    if not flags and not args.mlx_config:
        raise ConfigError(
            "nothing to train: no CONFIG file and no mlx-lm flags",
            fix="pass a YAML config (affinage train config.yaml --output runs/x), or mlx-lm's flags "
            "(affinage train --model smollm2-135m-instruct --data data)",
        )
    options = {**(read_mlx_yaml(Path(args.mlx_config)) if args.mlx_config else {}), **flags}
    raw = translate_mlx(options)
    output = run_directory(options, args.output, raw)
    source = args.mlx_config or "mlx-lm flags"
    config = config_from_dict(apply_overrides(raw, args.set), source=source, base_dir=Path.cwd(), overrides=args.set)
    if echo:
        print(f"# affinage config of this mlx-lm command (also written to {output / 'config.yaml'});")
        print(f"# `affinage train {output / 'config.yaml'} --output {output}` repeats the run")
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True), end="", flush=True)
        for line in notes(options):
            print(f"note: {line}", file=sys.stderr)
    return config, output


def read_mlx_yaml(path: Path) -> dict[str, Any]:
    """mlx-lm's -c file; an affinage config passed there is pointed at CONFIG."""
    raw = _read_yaml(path)
    if "base_model" in raw or "trainer" in raw or "adapter" in raw:
        raise ConfigError(
            "this is an affinage config, not mlx-lm's", where=str(path), fix=f"pass it as CONFIG: affinage train {path}"
        )
    unknown = sorted(set(raw) - KEYS - YAML_ONLY - FEATURE_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KEYS | YAML_ONLY | FEATURE_KEYS), n=1)
        raise ConfigError(
            f"unknown mlx-lm key(s) {', '.join(unknown)}" + (f" (did you mean '{close[0]}'?)" if close else ""),
            where=str(path),
            fix="use mlx_lm.lora's keys (docs/mlx-lm.md lists them and what affinage makes of each)",
        )
    if "lora_layers" in raw:
        raw.setdefault("num_layers", raw.pop("lora_layers"))
    raw.pop("config", None)
    return {key: _numbers(value) for key, value in raw.items() if value is not None}  # null: mlx-lm's default


def _numbers(value: Any) -> Any:
    """``1e-5`` is a float in mlx-lm's YAML (it adds the resolver YAML 1.1 lacks), a string in PyYAML's."""
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value.replace("_", ""))
    return value


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
        raise ConfigError(f"{key} must be a positive whole number, got {value!r}", where=_flag(key), fix="e.g. 2")
    return value


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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


def run_directory(options: dict[str, Any], output: str | None, raw: dict[str, Any]) -> Path:
    """--output, else mlx-lm's --adapter-path, else runs/<data folder>-<model>; the two flags must agree."""
    adapter_path = options.get("adapter_path")
    if output and adapter_path and Path(output).resolve() != (Path(adapter_path)).resolve():
        raise ConfigError(
            f"--output {output} and --adapter-path {adapter_path} name two run directories",
            where="--adapter-path",
            fix="keep one: in affinage --adapter-path is the run directory (its adapter is in DIR/adapter/)",
        )
    if output or adapter_path:
        return Path(output or adapter_path)
    data = Path(raw["data"].get("train") or raw["data"]["dataset"])
    name = data.stem if data.name != "data" or not data.is_dir() else data.parent.name  # ./data: the project's name
    model = Path(raw["base_model"]).name
    return Path("runs") / re.sub(r"[^\w.-]+", "-", f"{name}-{model}").strip("-").lower()


def notes(options: dict[str, Any]) -> list[str]:
    """What differs from mlx-lm when this command runs in affinage, said once before training."""
    masked = "the loss is on the completion only, as with mlx-lm's --mask-prompt: affinage always masks the prompt"
    lines = [] if options.get("mask_prompt") else [masked]
    if RECIPE_KEYS & set(options):
        lines.append("torch's Adam corrects its moments' bias (mlx-lm's default does not: its first steps are larger)")
        lines.append(
            "mlx-lm's recipe: its defaults fill what the command leaves out (rank 8, scale 20, 16 blocks, ...)"
        )
    else:
        lines.append(
            "no recipe option (--iters, --learning-rate, --num-layers, ...): affinage's defaults (docs/mlx-lm.md)"
        )
    if options.get("adapter_path"):
        path = options["adapter_path"]
        lines.append(
            f"--adapter-path {path} is the run directory: the adapter goes to {Path(path) / 'adapter'}/ (PEFT)"
        )
    if options.get("steps_per_report"):
        lines.append("--steps-per-report: affinage logs every step to metrics.jsonl")
    accumulation = options.get("grad_accumulation_steps") or 1
    if accumulation > 1:
        lines.append(f"--iters, --steps-per-eval and --save-every count iterations: divided by {accumulation}")
    return lines
