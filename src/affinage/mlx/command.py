"""``affinage train`` with mlx-lm's flags: the config it runs, its run directory, and what differs from mlx-lm."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from affinage.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from affinage.errors import ConfigError
from affinage.mlx.flags import given_flags, read_mlx_yaml
from affinage.mlx.translate import RECIPE_KEYS, translate_mlx


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
