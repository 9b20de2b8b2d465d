"""A trained run opened for use: its base model with the adapter, tokenizer, config and task.

The directory's layout is :class:`affinage.run_dir.RunDir`'s; this module loads what it holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from affinage.config import Config
from affinage.data import load_eval_sets, load_file
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.errors import AffinageError
from affinage.evaluate.task import evaluate_examples
from affinage.lora.peft_format import load_adapter
from affinage.models import load_base_model, resolve_dtype
from affinage.run_dir import RunDir


@dataclass
class LoadedRun:
    """A trained run loaded for use: the base model with its adapter."""

    path: Path
    config: Config
    model: Any
    tokenizer: Any
    task: dict[str, Any]

    @property
    def prompting(self) -> Prompting:
        return Prompting.from_config(self.config)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.path)

    def examples(self, data: str | Path | None = None) -> list[Example]:
        """Rows of ``data`` (default: the run's test split) with the run's transforms, ready to evaluate."""
        return load_file(self.config, Path(data) if data else self.run_dir.split_path("test"))


def open_run(
    run_dir: str | Path, *, with_adapter: bool = True, device: str | torch.device = "cpu", quantized: bool = True
) -> LoadedRun:
    """The run's base model (quantized as trained unless ``quantized=False``) with its adapter."""
    directory = RunDir(run_dir).require(adapter=with_adapter)
    config = directory.read_config()
    device = torch.device(device)
    dtype = resolve_dtype(config.trainer.precision, device)
    loaded = load_base_model(
        config.base_model,
        dtype=dtype,
        device=device,
        quantization=config.quantization if quantized else None,
        trust_remote_code=config.trust_remote_code,
    )
    if with_adapter:
        load_adapter(loaded.model, directory.adapter_dir)
    loaded.model.eval()
    return LoadedRun(
        path=directory.path, config=config, model=loaded.model, tokenizer=loaded.tokenizer, task=directory.read_task()
    )


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    with_adapter: bool = True,
) -> dict[str, Any]:
    """The run's task metrics on ``data`` (default: its test split); ``with_adapter=False``: the bare base model."""
    directory = RunDir(run_dir).require(adapter=with_adapter)
    examples = load_file(directory.read_config(), Path(data) if data else directory.split_path("test"))
    if not examples:  # read and checked before the model loads: a bad file fails in a second
        raise AffinageError("no examples to evaluate", fix="pass --data FILE.jsonl")
    run = open_run(run_dir, with_adapter=with_adapter, device=device)
    return evaluate_examples(run.model, run.tokenizer, examples, run.task, run.config, run.prompting)


def evaluate_sets(
    run_dir: str | Path, sets: dict[str, str | Path], *, device: torch.device | str = "cpu", with_base: bool = True
) -> dict[str, dict[str, Any]]:
    """Each named file, base vs fine-tuned: ``{name: {file, sha256, n, base, fine_tuned}}``, kept in eval.json.

    A set is evaluated again only when its file's content changed (or the base side is newly
    asked for), so a second ``affinage compare`` loads no model.
    """
    directory = RunDir(run_dir).require(adapter=True)
    config = directory.read_config()
    examples = load_eval_sets(config, sets)  # every file read and checked before any model loads
    known = dict((directory.read_eval() or {}).get("sets", {}))
    todo: dict[str, dict[str, Any]] = {}
    for name, path in sets.items():
        digest = hashlib.sha256(config.resolve_path(str(path)).read_bytes()).hexdigest()
        entry = known.get(name)
        if entry is None or entry.get("sha256") != digest or (with_base and entry.get("base") is None):
            todo[name] = {"file": str(path), "sha256": digest, "base": None}
    if todo:
        for side, with_adapter in (("base", False), ("fine_tuned", True)) if with_base else (("fine_tuned", True),):
            run = open_run(run_dir, with_adapter=with_adapter, device=device)
            for name, entry in todo.items():
                entry[side] = evaluate_examples(
                    run.model, run.tokenizer, examples[name], run.task, run.config, run.prompting
                )
        known.update({name: {**entry, "n": entry["fine_tuned"]["n"]} for name, entry in todo.items()})
        directory.write_eval({**(directory.read_eval() or {}), "sets": known})
    return {name: known[name] for name in sets}
