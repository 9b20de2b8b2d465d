"""The run directory: its layout, known in this one place.

Layout (``affinage train CONFIG --output DIR``)::

    DIR/config.yaml        the resolved config (paths absolute)
    DIR/task.json          task kind and label set
    DIR/data/{train,valid,test}.jsonl   the exact rows of each split
    DIR/adapter/           PEFT-format adapter (the best validation checkpoint)
    DIR/metrics.jsonl      one record per step and per validation
    DIR/eval.json          base and fine-tuned test metrics, with predictions
    DIR/summary.json       final metrics, speed and memory: its presence marks a finished run
    DIR/checkpoint/step-NNNNNN/  resume checkpoints while training (the newest complete one resumes; removed when
                           the run completes)
    DIR/.lock              the training process's pid while it runs (a dead process's lock is taken over)
    DIR/tensorboard/       event files when trainer.report_to has tensorboard
    DIR/report.html, report.md, report-curves.png   `affinage compare`
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml

from affinage.atomic import write_text_atomic
from affinage.config import Config, config_from_dict, config_to_dict
from affinage.data.formats import Example
from affinage.data.sources import is_reference
from affinage.data.transforms import BUILTIN
from affinage.errors import AffinageError
from affinage.evaluate.patterns import NAMED
from affinage.training.recipe import TrainPaths
from affinage.userfn import user_module_file

SPLITS = ("train", "valid", "test")
RESULTS = ("eval.json", "summary.json", "report.html", "report.md", "report-curves.png")
NOT_A_RUN_FIX = "pass the --output directory of `affinage train`"

Start = Literal["new", "resume", "finished"]


class RunDir:
    """Paths, reading and writing of one run directory; nothing else knows the file names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths --------------------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    task_path = property(lambda self: self.path / "task.json")
    eval_path = property(lambda self: self.path / "eval.json")
    summary_path = property(lambda self: self.path / "summary.json")
    training = property(lambda self: TrainPaths.under(self.path))  # adapter, checkpoint, metrics, tensorboard
    metrics_path = property(lambda self: self.training.metrics_path)
    adapter_dir = property(lambda self: self.training.adapter_dir)
    checkpoint_dir = property(lambda self: self.training.checkpoint_dir)
    tensorboard_dir = property(lambda self: self.training.tensorboard_dir)
    report_path = property(lambda self: self.path / "report.html")

    def split_path(self, name: str) -> Path:
        return self.path / "data" / f"{name}.jsonl"

    # --- what the directory holds --------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config_path.is_file()

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def is_finished(self) -> bool:
        return self.summary_path.is_file() and self.has_adapter()

    def require(self, *, adapter: bool = False) -> RunDir:
        """Itself, or a clear error when it is not a (trained) run."""
        if not self.is_run():
            raise AffinageError(f"{self.path} is not an affinage run (no config.yaml)", fix=NOT_A_RUN_FIX)
        if adapter and not self.has_adapter():
            raise AffinageError(
                f"{self.path} has no trained adapter yet", fix="let `affinage train` finish (it resumes if killed)"
            )
        return self

    # --- config, task, splits ------------------------------------------------------------------
    def read_config(self) -> Config:
        self.require()
        raw = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        return config_from_dict(raw, source=str(self.config_path), base_dir=self.path)

    def read_config_dict(self) -> dict[str, Any]:
        self.require()
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8"))

    def write_config(self, config: Config) -> None:
        write_text_atomic(self.config_path, config_yaml(config))
        for name in user_function_names(config):  # the run keeps its user code: eval/predict need it
            source = user_module_file(name, config.base_dir)
            if source.is_file():
                target = user_module_file(name, self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(target, source.read_text(encoding="utf-8"))

    def read_task(self) -> dict[str, Any]:
        return self.read_json("task.json") or {"task": "generation", "labels": None}

    def write_task(self, task: dict[str, Any]) -> None:
        self.write_json("task.json", task)

    def write_split(self, name: str, examples: list[Example]) -> None:
        # Rows as read (before transforms): loading them again applies the run's transforms once.
        rows = (e.original_row if e.original_row is not None else e.row for e in examples)
        lines = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        write_text_atomic(self.split_path(name), lines)

    def read_rows(self, name: str) -> list[dict[str, Any]]:
        path = self.split_path(name)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # --- results -------------------------------------------------------------------------------
    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path / name, data)

    def read_eval(self) -> dict[str, Any] | None:
        """``{"base": metrics, "fine_tuned": metrics}`` on the test split, with predictions."""
        return self.read_json("eval.json")

    def write_eval(self, evaluation: dict[str, Any]) -> None:
        self.write_json("eval.json", evaluation)

    def read_summary(self) -> dict[str, Any] | None:
        return self.read_json("summary.json")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    # --- a training run's life -----------------------------------------------------------------
    def start(self, config: Config, *, overwrite: bool = False) -> Start:
        """Make the directory ready to train ``config``: ``new``, ``resume`` or already ``finished``.

        The same config resumes (or, finished, does nothing); another config starts clean, but a
        finished run of another config is never deleted without ``overwrite`` (HF Trainer refuses
        likewise): its adapter and results would be lost.
        """
        wanted, previous = config_yaml(config), self._config_text()
        if previous == wanted and not overwrite:
            if self.is_finished():
                return "finished"
            if self.checkpoint_dir.is_dir():
                return "resume"
        elif previous is not None and self.is_finished() and not overwrite:
            changed = changed_keys(yaml.safe_load(previous), yaml.safe_load(wanted))
            raise AffinageError(
                f"{self.path} holds a finished run of another config ({changed}): training there would delete "
                "its adapter and results",
                fix="choose another --output, or pass --overwrite to replace that run",
            )
        self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        return "new"

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the directory for one training process: a second one is refused, a dead one's lock taken over.

        Also the first write into the directory, so an output that cannot be written fails here,
        before any model loads.
        """
        lock = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _take_lock(lock)
        except OSError as error:
            raise AffinageError(
                f"cannot write to {self.path}: {error.strerror}", fix="choose a writable --output"
            ) from None
        try:
            yield self
        finally:
            lock.unlink(missing_ok=True)

    def _config_text(self) -> str | None:
        return self.config_path.read_text(encoding="utf-8") if self.config_path.is_file() else None

    def clear(self) -> None:
        """Remove what a training run writes: no stale adapter, checkpoint or results survive."""
        for directory in (self.checkpoint_dir, self.adapter_dir, self.tensorboard_dir):
            shutil.rmtree(directory, ignore_errors=True)
        for name in RESULTS:
            (self.path / name).unlink(missing_ok=True)
        self.metrics_path.unlink(missing_ok=True)

    def save_copy(self, target: str | Path) -> RunDir:
        """A copy of this trained run in ``target`` that opens like it (Ludwig's ``model.save``): no resume state.

        What ``target`` held of an earlier run (adapter, results) is removed first, so the copy is whole.
        """
        self.require(adapter=True)
        copy = RunDir(target)
        if copy.path.resolve() == self.path.resolve():
            return copy
        if self.path.resolve() in copy.path.resolve().parents:
            raise AffinageError(f"cannot save {self.path} inside itself ({target})", fix="save it to another folder")
        skipped = (".lock", self.checkpoint_dir.name)  # resume state is the training directory's own
        copy.clear()
        shutil.copytree(
            self.path,
            copy.path,
            dirs_exist_ok=True,
            ignore=lambda folder, names: [n for n in names if Path(folder) == self.path and n in skipped],
        )
        return copy

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the summary (the run is then finished) and drop the resume state."""
        self.write_json("summary.json", summary)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def _take_lock(lock: Path) -> None:
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _alive(holder):
                raise AffinageError(
                    f"{lock.parent} is in use by process {holder} (another `affinage train`)",
                    fix="wait for it to finish, or train into another --output",
                ) from None
            lock.unlink(missing_ok=True)  # stale: the process that held it is gone
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def config_yaml(config: Config) -> str:
    """The run's config.yaml: the resolved config with data and model paths made absolute."""
    raw = config_to_dict(config)
    data = raw["data"]
    for key in ("dataset", "train", "valid", "test"):  # absolute, so the run works from anywhere
        if data.get(key) and not is_reference(data[key]):  # hf://, ludwig:// stay as written
            data[key] = str(config.resolve_path(data[key]).resolve())
    sets = raw["eval"]["sets"]
    for name, path in sets.items():
        sets[name] = str(config.resolve_path(path).resolve())
    base = Path(raw["base_model"]).expanduser()
    if config.resolve_path(raw["base_model"]).exists() and not base.is_absolute():  # a relative model path
        raw["base_model"] = str(config.resolve_path(raw["base_model"]).resolve())
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def user_function_names(config: Config) -> list[str]:
    names = [t.name for t in config.data.transforms if t.name not in BUILTIN]
    if config.eval.pattern and config.eval.pattern not in NAMED:
        names.append(config.eval.pattern)
    return names


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """``trainer.epochs: 2 -> 3, ...``: the first differences between two configs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = changed_keys(a, b, f"{prefix}{key}.")
            changes += [inner] if inner else []
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(changes[:3]) + (", ..." if len(changes) > 3 else "")
