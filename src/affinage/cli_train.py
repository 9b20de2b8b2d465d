"""``affinage train``: its flags (the config's, Ludwig's dataset flags, mlx-lm's) and what it runs.

A run is asked for three ways: a CONFIG file, Ludwig's ``--dataset``/``--training-set`` beside one,
or mlx-lm's flags alone (:mod:`affinage.mlx`); all three become one :class:`~affinage.config.Config`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def add_train_command(sub: Any, add_device_flag: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``train`` subcommand on the CLI's subparsers."""
    from affinage.mlx import add_mlx_flags

    p = sub.add_parser("train", help="fine-tune as CONFIG says, compare base vs fine-tuned on the test split")
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config (`affinage config` lists every key), or mlx-lm's data folder; or none: mlx-lm's flags",
    )
    p.add_argument(
        "--output", "-o", help="run directory to write (resumes an interrupted run); with mlx-lm's flags: runs/NAME"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. trainer.epochs=2"
    )
    p.add_argument("--no-base-eval", action="store_true", help="skip evaluating the base model first")
    p.add_argument(
        "--estimate", action="store_true", help="print the predicted peak memory and exit (no weights loaded)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of another (or the same) config")
    add_device_flag(p)
    _add_dataset_flags(p)
    add_mlx_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from affinage.mlx import train_config
    from affinage.pipeline import run_training
    from affinage.runtime import setup

    args.set = [*args.set, *_dataset_overrides(args)]  # Ludwig's --dataset / --training-set...: checked now
    config, output = train_config(args)  # the CONFIG file, or mlx-lm's flags / -c YAML (affinage.mlx)
    device = setup(args.device)
    if args.estimate:
        return _print_estimate(config, device)
    run_training(
        config,
        output,
        compare_base=not args.no_base_eval,
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=device,
    )
    return 0


def _dataset_overrides(args: argparse.Namespace) -> list[str]:
    """Ludwig's dataset flags as ``--set data.KEY=VALUE`` items (a file made absolute; hf://, ludwig:// read now)."""
    from affinage.data.sources import CLI_NAMES, data_section

    section = data_section(args.dataset, args.training_set, args.validation_set, args.test_set, names=CLI_NAMES)
    return [f"data.{key}={json.dumps(value)}" for key, value in section.items()]


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("Ludwig's dataset flags (instead of the config's data section; see docs/ludwig.md)")
    group.add_argument(
        "--dataset",
        metavar="FILE",
        help="train on FILE (or hf://ID[--SUBSET], ludwig://alpaca), split as the config says",
    )
    group.add_argument("--training-set", metavar="FILE", help="the training rows (or hf://ID: its train split)")
    group.add_argument("--validation-set", metavar="FILE", help="the validation rows, with --training-set")
    group.add_argument("--test-set", metavar="FILE", help="the test rows, never trained on, with --training-set")


def _print_estimate(config: Any, device: Any) -> int:
    """`train --estimate`: the predicted peak memory per process; no weight loaded, nothing written."""
    from affinage import distributed
    from affinage.pipeline import estimate_training

    estimate = estimate_training(config, device)
    if distributed.is_main():  # under torchrun every process estimates, rank 0 prints
        print(estimate.table())
    return 0
