"""``affinage data split``: one file -> train/valid/test.jsonl, rows written back unchanged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from affinage.data.formats import detect_format, read_rows
from affinage.data.split import lonely_label, normalise_text, strata, stratified_split
from affinage.errors import DataError

LABEL_FIELDS = ("completion", "output", "label")


def _label_field(row: dict[str, Any], by: str | None, where: str) -> str:
    if by:
        if by not in row:
            raise DataError(
                f"no field '{by}' to stratify by (fields: {', '.join(sorted(row))})",
                where=where,
                fix="pass --by with an existing field",
            )
        return by
    found = next((name for name in LABEL_FIELDS if name in row), None)
    if found is None and detect_format(row) != "chat":
        raise DataError("cannot tell which field is the label", where=where, fix="pass --by FIELD")
    return found or "messages"


def _text(row: dict[str, Any], label_field: str) -> str:
    if "messages" in row:
        return " ".join(m.get("content", "") for m in row["messages"] if m.get("role") != "assistant")
    return " ".join(
        v for k, v in sorted(row.items()) if k != label_field and isinstance(v, str)
    )  # ids and numbers are not content


def _label(row: dict[str, Any], field: str) -> str:
    if field == "messages":
        return str(row["messages"][-1].get("content", "")).strip()
    return str(row[field]).strip()


def split_file(
    path: Path,
    out_dir: Path,
    by: str | None = None,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 42,
) -> dict[str, Any]:
    rows = read_rows(path)
    field = _label_field(rows[0][1], by, f"{path}:{rows[0][0]}")
    labels = []
    for number, row in rows:
        if field != "messages" and field not in row:
            raise DataError(f"missing field '{field}'", where=f"{path}:{number}", fix="give every row the label field")
        labels.append(_label(row, field))
    labels = strata(labels)
    lonely = lonely_label(labels)
    if lonely is not None:
        first = next(number for number, row in rows if _label(row, field) == lonely)
        raise DataError(
            f"label '{lonely}' appears only once: it cannot be in train and in the test split",
            where=f"{path}:{first}",
            fix="add examples of that label or merge it into another",
        )
    splits = stratified_split(rows, labels, [_text(row, field) for _, row in rows], ratios, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "source": str(path),
        "stratified_by": field if labels[0] != "(all)" else None,
        "seed": seed,
        "splits": {},
    }
    for name, split in zip(("train", "valid", "test"), splits):
        (out_dir / f"{name}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in split), encoding="utf-8"
        )
        report["splits"][name] = {
            "rows": len(split),
            "per_label": dict(sorted(Counter(_label(row, field) for _, row in split).items()))
            if report["stratified_by"]
            else None,
        }
    report["rows_in_duplicate_groups"] = len(rows) - len({normalise_text(_text(row, field)) for _, row in rows})
    return report
