"""Data pipeline: files -> examples -> splits -> tokens -> batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from affinage.config import Config
from affinage.data.dedup import duplicate_groups, repeated_groups, summarise_groups
from affinage.data.formats import Example, examples_from_rows, load_examples
from affinage.data.sources import Role, is_reference, reference_rows
from affinage.data.split import lonely_label, split_groups, strata
from affinage.data.template import is_literal_template, render_prompt
from affinage.data.transforms import Transform, apply_transforms, build_transforms
from affinage.errors import DataError

__all__ = ["Example", "DataSplits", "load_splits", "load_file", "feature_fields"]


@dataclass
class DataSplits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)

    def non_empty(self) -> dict[str, list[Example]]:
        """The splits that hold examples, by name."""
        return {
            name: examples
            for name, examples in (("train", self.train), ("valid", self.valid), ("test", self.test))
            if examples
        }


def feature_fields(config: Config) -> tuple[str | None, str | None]:
    """Column names of the prompt and completion (None: detected from the row format)."""
    inputs = config.input_features or []
    outputs = config.output_features or []
    input_field = inputs[0].name if inputs and not is_literal_template(config.prompt.template) else None
    output_field = outputs[0].name if outputs else None
    return input_field, output_field


def config_transforms(config: Config) -> list[Transform]:
    return build_transforms(config.data.transforms, config.trainer.seed, config.base_dir)


def load_file(config: Config, path: str | Path, role: Role = "dataset", where: str = "") -> list[Example]:
    """Examples of one file (or dataset reference, read as ``role``), with the config's transforms applied
    (both sides: gold answers too)."""
    input_field, output_field = feature_fields(config)
    fields = {
        "input_field": input_field,
        "output_field": output_field,
        "templated": is_literal_template(config.prompt.template),
    }
    if is_reference(path):
        rows = reference_rows(str(path), role, where or str(path))
        examples = examples_from_rows(rows, str(path), **fields)
    else:
        examples = load_examples(Path(path), **fields)
    return apply_transforms(examples, config_transforms(config))


def locate(config: Config, value: str) -> str | Path:
    """A data key's file, resolved against the config's folder; a dataset reference (hf://, ludwig://) as is."""
    return value if is_reference(value) else config.resolve_path(value)


def load_eval_sets(config: Config, sets: dict[str, str | Path] | None = None) -> dict[str, list[Example]]:
    """Named evaluation files (default: the config's ``eval.sets``), read like the splits."""
    examples = {}
    for name, path in (config.eval.sets if sets is None else sets).items():
        file = config.resolve_path(str(path))
        if not file.is_file():
            raise DataError(
                f"evaluation set '{name}': {file} does not exist",
                where=f"eval.sets.{name}",
                fix="fix the path in eval.sets (or in compare --data NAME=FILE), or drop it",
            )
        examples[name] = load_file(config, file)
    return examples


def load_splits(config: Config) -> DataSplits:
    """Train/valid/test examples as the config's data section describes them."""
    data = config.data
    notes: list[str] = []
    if data.dataset:
        examples = load_file(config, locate(config, data.dataset), "dataset", "data.dataset")
        labels = strata([e.completion.strip() for e in examples])
        lonely = lonely_label(labels)
        if lonely is not None:
            where = next(e.source for e in examples if e.completion.strip() == lonely)
            raise DataError(
                f"label '{lonely}' appears only once: it cannot be in train and in the test split",
                where=where,
                fix="add examples of that label, merge it into another, or give data.train/valid/test files",
            )
        groups = duplicate_groups([e.identity_text() for e in examples], data.split.near_duplicate_threshold)
        train, valid, test = split_groups(examples, labels, groups, data.split.ratios, data.split.seed)
        repeated = repeated_groups(groups)
        kept = summarise_groups(repeated, [e.source or "?" for e in examples]) if repeated else "no duplicates"
        notes.append(
            f"split {len(examples)} rows of {data.dataset} into {len(train)}/{len(valid)}/{len(test)} "
            f"(stratified; {kept}, each kept in one split)"
        )
    elif data.train:
        root = locate(config, data.train)
        if isinstance(root, Path) and root.is_dir():  # mlx-lm layout: a folder with train/valid/test.jsonl
            paths: dict[str, str | Path | None] = {name: root / f"{name}.jsonl" for name in ("train", "valid", "test")}
        else:
            paths = {
                "train": root,
                "valid": data.valid and locate(config, data.valid),
                "test": data.test and locate(config, data.test),
            }
        train, valid, test = (
            load_file(config, path, name, f"data.{name}")  # type: ignore[arg-type]
            if path and (name == "train" or is_reference(path) or Path(path).exists())
            else []
            for name, path in paths.items()
        )
    else:
        raise DataError(
            "no data: the config names neither data.dataset nor data.train",
            where="config",
            fix="add data: {dataset: emails.jsonl} or data: {train: ..., valid: ..., test: ...}",
        )
    train = _sample(train, config, notes)
    if not train:
        raise DataError("the training split is empty", where="config data", fix="add training rows")
    return DataSplits(train=train, valid=valid, test=test, notes=notes)


def _sample(train: list[Example], config: Config, notes: list[str]) -> list[Example]:
    """Ludwig's ``preprocessing.sample_ratio`` / ``sample_size``: train on a seeded sample of the training rows."""
    ratio = float(config.preprocessing.get("sample_ratio", 1.0) or 1.0)
    size = config.preprocessing.get("sample_size")
    if ratio < 1.0 and size is not None:
        raise DataError(
            "preprocessing.sample_ratio and sample_size are both set",
            where="preprocessing",
            fix="keep one of them (as Ludwig requires)",
        )
    rng = random.Random(config.trainer.seed)
    if ratio < 1.0:
        train = rng.sample(train, max(1, int(len(train) * ratio)))
        notes.append(f"sample_ratio {ratio}: training on {len(train)} rows")
    elif size is not None and int(size) < len(train):
        train = rng.sample(train, max(1, int(size)))
        notes.append(f"sample_size {size}: training on {len(train)} rows")
    return train


def preview(tokenizer, example: Example, config: Config) -> str:
    """An example exactly as training renders it: prompt, then the completion."""
    return render_prompt(tokenizer, example, config.prompt.template, config.prompt.system) + example.completion
