"""Datasets as Ludwig names them: ``hf://ID[--SUBSET]``, ``ludwig://NAME`` and in-memory tables.

A Ludwig user writes ``model.train(dataset="ludwig://alpaca")``, ``--dataset hf://tatsu-lab/alpaca``
or passes a DataFrame. affinage reads such references offline, from the caches that ``datasets``
and Ludwig fill, into the same rows a data file gives; what is missing fails before any model
loads, naming the flag and the command that fetches it. A table (DataFrame, rows, columns) is
written once into affinage's cache, named by its content, so the run's config can point at it and
the same table resumes the same run.

Where a reference is used decides its rows: as the one ``dataset`` (split as the config says),
every split of it; as ``train``/``valid``/``test`` (Ludwig's ``training_set``/...), the
matching split of the Hub dataset, or of Ludwig's ``split`` column (0, 1, 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from affinage.atomic import write_text_atomic
from affinage.cache import cache_dir
from affinage.errors import DataError

HF_PREFIX = "hf://"
LUDWIG_PREFIX = "ludwig://"
Role = Literal["dataset", "train", "valid", "test"]
Rows = list[tuple[int | str, dict[str, Any]]]

# A Hub dataset's split names for each role, in order of preference.
HF_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
# Ludwig's `split` column: 0 train, 1 validation, 2 test.
LUDWIG_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
# Ludwig's raw download of a dataset, read when its processed Parquet is absent (ludwig/datasets/configs).
LUDWIG_RAW = {
    "alpaca": (
        "alpaca_1.0",
        "alpaca_data.json",
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    )
}
# Ludwig's API argument (and CLI flag) for each data key, for error messages.
PYTHON_NAMES = {"dataset": "dataset=", "train": "training_set=", "valid": "validation_set=", "test": "test_set="}
CLI_NAMES = {"dataset": "--dataset", "train": "--training-set", "valid": "--validation-set", "test": "--test-set"}

_AS_DATASET = "pass it as the one dataset (dataset= / --dataset {reference}): it is then split as the config says"
_loaded: dict[str, dict[str, list[dict[str, Any]]]] = {}  # reference -> split -> rows, read once per process


def is_reference(value: Any) -> bool:
    """Whether ``value`` names a dataset by reference rather than by file path."""
    return isinstance(value, str) and value.startswith((HF_PREFIX, LUDWIG_PREFIX))


def reference_rows(reference: str, role: Role, where: str) -> Rows:
    """The rows ``reference`` gives in ``role`` (see the module docstring); a DataError names ``where``."""
    splits = _load(reference, where)
    if role == "dataset":
        named = [(name, rows) for name, rows in splits.items()]
    elif reference.startswith(HF_PREFIX):
        name = next((name for name in HF_SPLITS[role] if name in splits), None)
        if name is None and role == "train":
            raise DataError(
                f"{reference} has no train split (it has: {', '.join(splits) or 'none'})",
                where=where,
                fix=_AS_DATASET.format(reference=reference),
            )
        named = [(name, splits[name])] if name else []
    else:
        named = [(role, splits[role])] if role in splits else []
        if not named and "all" in splits and role == "train":
            named = [("train", splits["all"])]
        elif not named and "all" in splits:
            raise DataError(
                f"{reference} has no `split` column: it holds no {role} split",
                where=where,
                fix=_AS_DATASET.format(reference=reference),
            )
    rows: Rows = []
    for name, split_rows in named:
        for index, row in enumerate(split_rows):
            rows.append((f"{name} row {index}", {key: value for key, value in row.items() if key != "split"}))
    if not rows and role in ("dataset", "train"):
        raise DataError(f"{reference} holds no rows", where=where, fix="check the dataset id and subset")
    return rows


def _load(reference: str, where: str) -> dict[str, list[dict[str, Any]]]:
    if reference not in _loaded:
        if reference.startswith(HF_PREFIX):
            _loaded[reference] = _load_hf(reference, where)
        else:
            _loaded[reference] = _load_ludwig(reference, where)
    return _loaded[reference]


def hf_id_and_subset(reference: str) -> tuple[str, str | None]:
    """``hf://mstz/adult--income`` -> ``("mstz/adult", "income")``, as Ludwig reads it."""
    dataset_id, _, subset = reference[len(HF_PREFIX) :].partition("--")
    return dataset_id, subset or None


def _load_hf(reference: str, where: str) -> dict[str, list[dict[str, Any]]]:
    """Every split of a Hub dataset from the local ``datasets`` cache, never the network."""
    dataset_id, subset = hf_id_and_subset(reference)
    arguments = repr(dataset_id) + (f", {subset!r}" if subset else "")
    fetch = f'python -c "import datasets; datasets.load_dataset({arguments})" (once, online; then it is cached)'
    if not dataset_id:
        raise DataError(f"{reference}: no dataset id", where=where, fix="write hf://ID or hf://ID--SUBSET")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{reference} needs the `datasets` library", where=where, fix="pip install 'affinage[ludwig]'"
        ) from None
    try:
        with _offline(datasets):
            loaded = datasets.load_dataset(dataset_id, subset, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except Exception as error:  # ConnectionError, FileNotFoundError, ValueError (subset): all mean "not cached"
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"{reference} is not in the local Hugging Face datasets cache (offline: {cause})",
            where=where,
            fix=f"download it: {fetch}; or set HF_DATASETS_CACHE to the cache that holds it",
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded.to_list()}
    return {name: split.to_list() for name, split in loaded.items()}


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 for this call: the cache or nothing, quietly."""
    config = datasets.config
    saved = (config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE, datasets.logging.get_verbosity())
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    datasets.logging.set_verbosity_error()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved[0], saved[1]
        datasets.logging.set_verbosity(saved[2])
        if not bars:
            datasets.enable_progress_bars()


def ludwig_cache() -> Path:
    """Ludwig's dataset cache: ``LUDWIG_CACHE``, else ``~/.ludwig_cache`` (ludwig.utils.fs_utils)."""
    return Path(os.environ.get("LUDWIG_CACHE") or Path.home() / ".ludwig_cache")


def _load_ludwig(reference: str, where: str) -> dict[str, list[dict[str, Any]]]:
    """A Ludwig dataset as Ludwig's loaders leave it: ``NAME_VERSION/processed/NAME.parquet``, else its raw file."""
    name = reference[len(LUDWIG_PREFIX) :]
    root = ludwig_cache()
    processed = sorted(root.glob(f"{name}_*/processed/{name}.parquet")) if name else []
    raw = LUDWIG_RAW.get(name)
    raw_path = root / raw[0] / "raw" / raw[1] if raw else None
    if processed:
        import pyarrow.parquet as pq

        rows = pq.read_table(processed[-1]).to_pylist()
    elif raw_path is not None and raw_path.is_file():
        rows = json.loads(raw_path.read_text(encoding="utf-8"))
    else:
        looked = f"{root}/{name}_*/processed/{name}.parquet" + (f" or {raw_path}" if raw_path else "")
        if raw:
            fix = (
                f"download it: mkdir -p {raw_path.parent} && curl -L -o {raw_path} {raw[2]} "
                f'(or, with Ludwig installed: python -c "from ludwig.datasets import {name}; {name}.load()"); '
                "or set LUDWIG_CACHE to the folder that holds it"
            )
        else:
            fix = (
                f'with Ludwig installed: python -c "from ludwig.datasets import get_dataset; '
                f"get_dataset('{name}').load()\"; or set LUDWIG_CACHE to the folder that holds it"
            )
        raise DataError(f"{reference} is not in Ludwig's dataset cache (looked for {looked})", where=where, fix=fix)
    if rows and all("split" in row for row in rows):
        codes = {code: role for role, code in LUDWIG_SPLIT_CODES.items()}
        splits: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            splits.setdefault(codes.get(int(row["split"]), "train"), []).append(row)
        return splits
    return {"all": rows}


def table_file(table: Any, where: str) -> Path:
    """A DataFrame, a list of rows or a dict of columns, written once as JSONL into affinage's cache.

    Named by its content: the same table gives the same path, so the run's config (which names
    the file) is the same and an interrupted run resumes.
    """
    text = _table_jsonl(table, where)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    path = cache_dir() / "datasets" / f"table-{digest}.jsonl"
    if not path.is_file():
        write_text_atomic(path, text)
    return path


def table_rows(table: Any, where: str) -> list[dict[str, Any]]:
    """A DataFrame, a list of rows or a dict of columns as rows (JSON types: what a JSONL file would give)."""
    return [json.loads(line) for line in _table_jsonl(table, where).splitlines() if line.strip()]


def _table_jsonl(table: Any, where: str) -> str:
    if hasattr(table, "to_json") and hasattr(table, "columns"):  # a pandas DataFrame (pandas is not imported)
        if len(table) == 0:
            raise DataError("the DataFrame has no rows", where=where, fix="pass a DataFrame with one row per example")
        text = table.to_json(orient="records", lines=True, force_ascii=False, date_format="iso")
        return text if text.endswith("\n") else text + "\n"
    if isinstance(table, dict):  # Ludwig's dict format: column -> values
        lengths = {len(values) for values in table.values() if isinstance(values, (list, tuple))}
        if len(lengths) != 1 or len(table) != sum(isinstance(v, (list, tuple)) for v in table.values()):
            raise DataError(
                "a dict dataset must map each column to a list of values, all of one length",
                where=where,
                fix='pass {"prompt": [...], "completion": [...]}, a list of rows or a DataFrame',
            )
        table = [dict(zip(table, values)) for values in zip(*table.values())]
    if isinstance(table, (list, tuple)) and table and all(isinstance(row, dict) for row in table):
        return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in table)
    raise DataError(
        f"cannot read a dataset from a {type(table).__name__}",
        where=where,
        fix="pass a file path, hf://ID, ludwig://alpaca, a pandas DataFrame, a list of rows or a dict of columns",
    )


def data_argument(value: Any, role: Role, where: str) -> str:
    """What the config's data section holds for one of Ludwig's dataset arguments, checked now.

    A reference stays as written (read now, so a missing one fails before any model loads); a
    table becomes its cached file; a path becomes absolute and must exist.
    """
    if is_reference(value):
        reference_rows(value, role, where)
        return value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser().resolve()
        if path.is_file() or (role == "train" and path.is_dir()):
            return str(path)
        raise DataError(
            f"data file not found: {value}",
            where=where,
            fix="pass an existing JSONL/JSON/CSV/Parquet file, hf://ID[--SUBSET] or ludwig://alpaca",
        )
    return str(table_file(value, where))


def data_section(
    dataset: Any = None,
    training_set: Any = None,
    validation_set: Any = None,
    test_set: Any = None,
    *,
    names: dict[str, str] = PYTHON_NAMES,
) -> dict[str, str | None]:
    """The config's ``data`` keys for Ludwig's four dataset arguments (``{}``: none given, the config's own).

    As in Ludwig, ``dataset`` is split as the config says; ``training_set`` (with optional
    ``validation_set`` and ``test_set``) is used as given. ``names`` spells the arguments in errors.
    """
    if dataset is None and training_set is None:
        for role, value in (("valid", validation_set), ("test", test_set)):
            if value is not None:
                raise DataError(
                    f"{names[role]} without {names['train']}",
                    where=names[role],
                    fix=f"also pass {names['train']} (the rows to train on), or pass one {names['dataset']}",
                )
        return {}
    if dataset is not None and training_set is not None:
        raise DataError(
            f"both {names['dataset']} and {names['train']}",
            where=names["dataset"],
            fix=f"pass one: {names['dataset']} (split as the config says) or {names['train']} (+ validation/test sets)",
        )
    if dataset is not None:
        return {
            "dataset": data_argument(dataset, "dataset", names["dataset"]),
            "train": None,
            "valid": None,
            "test": None,
        }
    section: dict[str, str | None] = {"dataset": None}
    for role, value in (("train", training_set), ("valid", validation_set), ("test", test_set)):
        section[role] = None if value is None else data_argument(value, role, names[role])  # type: ignore[arg-type]
    return section
