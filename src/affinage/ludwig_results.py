"""What ``LudwigModel`` takes and returns, in Ludwig's shapes (``ludwig/api.py``, ``ludwig/api_types.py``).

Why apart from :mod:`affinage.ludwig_api`: the class there is the flow (train, predict, save...);
this is the translation of its inputs (rows, files, tables, references) and results (training
statistics, splits, prediction tables) between Ludwig's forms and an affinage run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from affinage.api import Run
from affinage.data.formats import read_rows
from affinage.data.sources import is_reference, reference_rows, table_file, table_rows
from affinage.errors import AffinageError
from affinage.run_dir import RunDir


@dataclass
class TrainingStats:
    """Ludwig's training statistics: per split, ``{feature or "combined": {metric: [values]}}``."""

    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, split: str) -> dict[str, Any]:
        return {"training": self.training, "validation": self.validation, "test": self.test}[split]

    def keys(self) -> tuple[str, ...]:
        return ("training", "validation", "test")


class PreprocessedData(NamedTuple):
    """The rows of each split as the run trained on them, and the task (Ludwig's training set metadata)."""

    training_set: list[dict[str, Any]]
    validation_set: list[dict[str, Any]]
    test_set: list[dict[str, Any]]
    training_set_metadata: dict[str, Any]


class TrainingResults(NamedTuple):
    """What ``LudwigModel.train`` returns, unpackable as Ludwig's ``(train_stats, preprocessed_data, output_dir)``."""

    train_stats: TrainingStats
    preprocessed_data: PreprocessedData
    output_directory: str


def new_output_directory(root: str | Path, experiment_name: str, model_name: str) -> Path:
    """Ludwig's run folder: ``root/<experiment>_<model>``, then ``_0``, ``_1``... when it exists."""
    base = Path(root).resolve() / (experiment_name + (f"_{model_name}" if model_name else ""))  # absolute, as Ludwig
    candidate, suffix = base, 0
    while candidate.exists():
        candidate, suffix = Path(f"{base}_{suffix}"), suffix + 1
    return candidate


def find_run(model_path: str | Path, where: str) -> Path:
    """The trained run at ``model_path``: a train folder, a ``save`` folder, or Ludwig's ``.../model`` below one."""
    path = Path(model_path)
    for candidate in (path, path / "model", *([path.parent] if path.name == "model" else [])):
        if RunDir(candidate).is_run() and RunDir(candidate).has_adapter():
            return candidate
    raise AffinageError(
        f"{model_path} holds no trained affinage run (no config.yaml and adapter/)",
        where=where,
        fix="pass the folder train() returned (e.g. results/api_experiment_run) or one written by model.save()",
    )


def training_stats(run: Run, name: str) -> TrainingStats:
    """Ludwig's shape from metrics.jsonl and summary.json: training and validation losses, the final test metrics."""
    records = run.directory.read_metrics()
    validations = [r for r in records if "valid_loss" in r]
    stats = TrainingStats(
        training={"combined": {"loss": [r["loss"] for r in records if "loss" in r]}},
        validation={"combined": {"loss": [r["valid_loss"] for r in validations]}},
    )
    scores = [r["valid_score"] for r in validations if r.get("valid_score") is not None]
    if scores:
        stats.validation[name] = {"score": scores}
    tuned = run.summary.get("fine_tuned_test") or {}
    numbers = {key: [value] for key, value in tuned.items() if isinstance(value, (int, float))}
    if numbers:
        stats.test = {name: numbers, "combined": {"loss": numbers.get("loss", [None])}}
    return stats


def preprocessed_data(run: Run) -> PreprocessedData:
    directory = run.directory
    return PreprocessedData(
        directory.read_rows("train"), directory.read_rows("valid"), directory.read_rows("test"), directory.read_task()
    )


def inference_rows(dataset: Any) -> list[str | dict[str, Any]]:
    """What to predict, as prompts or rows: a DataFrame, rows, prompts, a dict of columns, a file or a reference."""
    where = "predict(dataset=)"
    if dataset is None:
        raise AffinageError("nothing to predict", where=where, fix="pass a DataFrame, a list of rows or a file")
    if is_reference(dataset):
        return [row for _, row in reference_rows(dataset, "dataset", where)]
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if not path.is_file():
            raise AffinageError(
                f"data file not found: {dataset}", where=where, fix="pass an existing file; texts go in a list: [text]"
            )
        return [row for _, row in read_rows(path)]
    if isinstance(dataset, list) and all(isinstance(item, (str, dict)) for item in dataset):
        return list(dataset)
    return list(table_rows(dataset, where))


def evaluation_file(dataset: Any) -> str:
    """A file ``Run.evaluate`` reads: a path as is, a reference's rows or a table written to the cache."""
    where = "evaluate(dataset=)"
    if is_reference(dataset):
        return str(table_file([row for _, row in reference_rows(dataset, "dataset", where)], where))
    if isinstance(dataset, (str, Path)):
        return str(dataset)
    return str(table_file(dataset, where))


def as_table(columns: dict[str, list[Any]], return_type: Any = None) -> Any:
    """A pandas DataFrame (Ludwig's default), or the dict of columns with ``return_type=dict``."""
    if return_type is dict or return_type == "dict":
        return columns
    try:
        import pandas
    except ImportError:
        raise AffinageError(
            "predictions as a DataFrame need pandas", fix="pip install 'affinage[ludwig]', or pass return_type=dict"
        ) from None
    return pandas.DataFrame(columns)
