"""The facts a model card states, read from the run's own files only (config, task, splits, summary)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from affinage.errors import AffinageError
from affinage.models import base_model_hub_id
from affinage.run_dir import SPLITS, RunDir


@dataclass
class RunFacts:
    """What a card says about a run, read once from its files."""

    name: str
    config: dict[str, Any]
    config_text: str
    task: dict[str, Any]
    summary: dict[str, Any] | None
    rows: dict[str, int]
    label_counts: dict[str, Counter] = field(default_factory=dict)

    @property
    def base_model(self) -> str:
        return base_model_hub_id(str(self.config.get("base_model", "")))

    @property
    def base_hub_id(self) -> str | None:
        """The base as a Hub id, or None for a local path (the Hub rejects a path as ``base_model``)."""
        base = self.base_model
        if not base or base.startswith((".", "/", "~")) or base.endswith(".gguf") or Path(base).expanduser().exists():
            return None
        try:
            validate_repo_id(base)
        except HFValidationError:
            return None
        return base


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file of the run, or None when it is missing or unreadable (an interrupted run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _count_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def _label_counts(run_dir: Path) -> dict[str, Counter]:
    """Label counts per split, read through the run's transforms; empty when the rows cannot be read here."""
    from affinage.data import load_file

    try:
        directory = RunDir(run_dir)
        config = directory.read_config()
        files = {split: directory.split_path(split) for split in SPLITS}
        return {
            split: Counter(e.completion.strip() for e in load_file(config, path))
            for split, path in files.items()
            if path.is_file()
        }
    except (AffinageError, OSError, ValueError, ImportError):
        return {}


def read_run_facts(run_dir: Path, name: str | None = None) -> RunFacts:
    """The card's facts; a run needs its config.yaml, everything else is optional."""
    directory = RunDir(run_dir).require()
    config_text = directory.config_path.read_text(encoding="utf-8")
    task = _read_json(directory.task_path) or {"task": "generation", "labels": None}
    facts = RunFacts(
        name=name or directory.path.resolve().name,
        config=yaml.safe_load(config_text) or {},
        config_text=config_text,
        task=task,
        summary=_read_json(directory.summary_path),
        rows={split: _count_rows(directory.split_path(split)) for split in SPLITS},
    )
    if task.get("task") == "classification" and task.get("labels"):
        facts.label_counts = _label_counts(run_dir)
    return facts
