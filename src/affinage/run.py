"""The run directory: everything needed to use, evaluate or resume a fine-tuned model.

Layout (``affinage train ... --output DIR``)::

    DIR/config.yaml        the resolved config (paths absolute)
    DIR/task.json          task kind and label set
    DIR/data/{train,valid,test}.jsonl   the exact rows of each split
    DIR/adapter/           PEFT-format adapter (best validation loss)
    DIR/metrics.jsonl      one record per step and per validation
    DIR/summary.json       final metrics, speed and memory
    DIR/checkpoint/        resume state while training (removed when the run completes)
    DIR/tensorboard/       TensorBoard event files (with trainer.report_to: [tensorboard])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from affinage.atomic import write_text_atomic
from affinage.config import Config, config_from_dict, config_to_dict
from affinage.data.formats import Example
from affinage.errors import AffinageError
from affinage.evaluate import Prompting
from affinage.userfn import user_module_file


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_run_config(run_dir: Path, config: Config) -> None:
    raw = config_to_dict(config)
    data = raw["data"]
    for key in ("dataset", "train", "valid", "test"):  # absolute, so the run works from anywhere
        if data.get(key):
            data[key] = str(config.resolve_path(data[key]).resolve())
    base = Path(raw["base_model"]).expanduser()
    if config.resolve_path(raw["base_model"]).exists() and not base.is_absolute():  # a relative model path
        raw["base_model"] = str(config.resolve_path(raw["base_model"]).resolve())
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    for name in user_function_names(config):  # the run keeps its user code: eval/predict need it
        source = user_module_file(name, config.base_dir)
        if source.is_file():
            target = user_module_file(name, run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, source.read_text(encoding="utf-8"))


def user_function_names(config: Config) -> list[str]:
    from affinage.data.transforms import BUILTIN
    from affinage.patterns import NAMED

    names = [t.name for t in config.data.transforms if t.name not in BUILTIN]
    if config.eval.pattern and config.eval.pattern not in NAMED:
        names.append(config.eval.pattern)
    return names


def save_split(run_dir: Path, name: str, examples: list[Example]) -> None:
    # Rows as read (before transforms): loading them again applies the run's transforms once.
    lines = "".join(
        json.dumps(e.original_row if e.original_row is not None else e.row, ensure_ascii=False, default=str) + "\n"
        for e in examples
    )
    write_text_atomic(run_dir / "data" / f"{name}.jsonl", lines)


def prompting_for(config: Config) -> Prompting:
    return Prompting(template=config.prompt.template, system=config.prompt.system, max_len=config.trainer.max_seq_len)


@dataclass
class Run:
    """A trained run loaded for use: the base model with its adapter."""

    path: Path
    config: Config
    model: Any
    tokenizer: Any
    task: dict[str, Any]

    @property
    def prompting(self) -> Prompting:
        return prompting_for(self.config)

    def examples(self, data: str | Path | None = None) -> list[Example]:
        """Rows of ``data`` (default: the run's test split) with the run's transforms, ready to evaluate."""
        from affinage.data import load_file

        return load_file(self.config, Path(data) if data else self.path / "data" / "test.jsonl")


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise AffinageError(
            f"{run_dir} is not an affinage run (no config.yaml)", fix="pass the --output directory of `affinage train`"
        )
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path), base_dir=run_dir)


def load_run(run_dir: str | Path, *, with_adapter: bool = True, device: str = "cpu", quantized: bool = True) -> Run:
    """The run's base model (quantized as trained unless ``quantized=False``) with its adapter."""
    from affinage.lora.peft_format import load_adapter
    from affinage.models import load_base_model, resolve_dtype

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if with_adapter and not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise AffinageError(
            f"{run_dir} has no trained adapter yet", fix="let `affinage train` finish (it resumes if killed)"
        )
    dtype = resolve_dtype(config.trainer.precision, torch.device(device))
    quantization = config.quantization if quantized else None
    loaded = load_base_model(
        config.base_model,
        dtype=dtype,
        device=device,
        quantization=quantization,
        trust_remote_code=config.trust_remote_code,
    )
    if with_adapter:
        load_adapter(loaded.model, run_dir / "adapter")
    task_path = run_dir / "task.json"
    task = json.loads(task_path.read_text()) if task_path.is_file() else {"task": "generation", "labels": None}
    loaded.model.eval()
    return Run(path=run_dir, config=config, model=loaded.model, tokenizer=loaded.tokenizer, task=task)
