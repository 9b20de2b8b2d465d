"""``affinage data split``: one file -> train/valid/test.jsonl, rows written back unchanged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from affinage.config import SplitConfig
from affinage.data.dedup import describe_group, duplicate_groups, is_exact, repeated_groups
from affinage.data.formats import detect_format, read_rows
from affinage.data.split import lonely_label, split_groups, strata
from affinage.errors import DataError

LABEL_FIELDS = ("completion", "output", "label")
SHOWN_GROUPS = 5  # duplicate groups listed in the report
PREVIEW_CHARS = 100  # of each listed row's text


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


def _preview(text: str) -> str:
    """Start and end of a text: templated rows share their start, the email often ends the prompt."""
    text = " ".join(text.split())
    if len(text) <= PREVIEW_CHARS:
        return text
    head = PREVIEW_CHARS * 2 // 5
    return text[:head] + " … " + text[-(PREVIEW_CHARS - head - 3) :]


def _duplicates_report(
    groups: list[list[int]], texts: list[str], names: list[str], threshold: float | None
) -> dict[str, Any]:
    """The groups kept together: how many, their rows, and the first few with their texts."""
    repeated = repeated_groups(groups)
    return {
        "near_duplicate_threshold": threshold,
        "groups": len(repeated),
        "rows": sum(len(members) for members in repeated),
        "examples": [
            {
                "rows": describe_group(members, names),
                "kind": "exact" if is_exact(texts, members) else "near",
                "texts": [_preview(texts[i]) for i in members[:4]],
            }
            for members in repeated[:SHOWN_GROUPS]
        ],
    }


def split_file(
    path: Path,
    out_dir: Path,
    by: str | None = None,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    near_duplicate_threshold: float | None = SplitConfig().near_duplicate_threshold,
) -> dict[str, Any]:
    """Write train/valid/test.jsonl from ``path``; returns the report `affinage data split` prints."""
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
    texts = [_text(row, field) for _, row in rows]
    groups = duplicate_groups(texts, near_duplicate_threshold)
    splits = split_groups(rows, labels, groups, ratios, seed)
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
    names = [f"{path.name}:{number}" for number, _ in rows]
    report["duplicates_kept_together"] = _duplicates_report(groups, texts, names, near_duplicate_threshold)
    return report
