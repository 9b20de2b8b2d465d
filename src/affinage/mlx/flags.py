"""mlx-lm's command line and ``-c`` YAML as the user wrote them: ``mlx_lm.lora``'s flags on ``affinage train``,
the YAML read with mlx-lm's number rules, and the error that refuses an option by the name the user knows."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

from affinage.config import _read_yaml
from affinage.errors import ConfigError

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


def refuse(key: str, what: str, fix: str) -> ConfigError:
    """mlx-lm's option (a flag's name for what has one, else the YAML key) refused, saying why and what instead."""
    flag = flag_name(key) if key in KEYS else key
    return ConfigError(f"mlx-lm's `{flag}` ({what}) is not supported by affinage", where=flag, fix=fix)


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


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
