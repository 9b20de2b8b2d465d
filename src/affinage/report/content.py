"""What the comparison report says, independent of how it is written (HTML or Markdown).

:mod:`affinage.report.compare` gathers a :class:`RunReport` from a run directory and writes it;
:mod:`affinage.report.render` lays out the rows computed here. Both import this module, so the
dependencies point one way (compare -> compare_render -> compare_content).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from affinage.report import TASK_METRIC

SIDE_BY_SIDE_ROWS = 40


@dataclass
class RunReport:
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    base: dict[str, Any] | None
    tuned: dict[str, Any]
    prompts: list[str]
    splits: dict[str, int]
    curves_png: bytes | None
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and key in (
        "accuracy",
        "macro_f1",
        "exact_match",
        "pattern_score",
        "coverage",
        "answered_accuracy",
    ):
        return f"{value:.1%}" if key != "macro_f1" else f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def glance_rows(report: RunReport) -> list[tuple[str, str]]:
    s, c = report.summary, report.config
    adapter, trainer = c.get("adapter", {}), c.get("trainer", {})
    return [
        ("base model", str(c.get("base_model"))),
        (
            "adapter",
            f"LoRA r={adapter.get('r')} alpha={adapter.get('alpha')} on {adapter.get('target_modules')}"
            + (f", blocks {adapter.get('layers_to_transform')}" if adapter.get("layers_to_transform") else ""),
        ),
        ("quantization", f"{c['quantization']['bits']}-bit" if c.get("quantization") else "none"),
        (
            "trainer",
            f"lr {trainer.get('learning_rate')}, batch {trainer.get('batch_size')}, "
            f"epochs {trainer.get('epochs')}, max_seq_len {trainer.get('max_seq_len')}",
        ),
        (
            "data",
            f"{report.splits['train']} train / {report.splits['valid']} valid / {report.splits['test']} test rows",
        ),
        (
            "training",
            f"{s.get('steps', '-')} steps in {_fmt(s.get('train_seconds'))} s, "
            f"{_fmt(s.get('train_tokens_per_second'))} tokens/s, "
            f"peak memory {_fmt(s.get('peak_memory_mb'))} MB ({s.get('precision', '-')}, {s.get('device', '-')})",
        ),
        ("best checkpoint", f"step {s.get('best_step', '-')}, validation loss {_fmt(s.get('best_valid_loss'))}"),
    ]


def metric_rows(report: RunReport) -> list[tuple[str, str, str]]:
    tuned, base = report.tuned, report.base or {}
    keys = {
        "classification": ["accuracy", "macro_f1", "coverage", "answered_accuracy"],
        "generation": ["chrf", "exact_match", "mean_output_words"],
        "pattern": ["pattern_score", "mean_output_words"],
    }[tuned["task"]] + ["loss", "perplexity", "examples_per_second"]
    rows = [
        (key.replace("_", " "), _fmt(base.get(key), key), _fmt(tuned.get(key), key)) for key in keys if key in tuned
    ]
    for label, stats in tuned.get("per_class", {}).items():
        before = base.get("per_class", {}).get(label, {}).get("f1")
        rows.append((f"F1 {label}", _fmt(before), _fmt(stats["f1"])))
    return rows


def set_rows(report: RunReport) -> list[list[str]]:
    """One row per named evaluation set: its size and the task metric (and macro-F1), base and fine-tuned."""
    rows = []
    for name, entry in report.sets.items():
        tuned, base = entry["fine_tuned"], entry.get("base") or {}
        key = TASK_METRIC[tuned["task"]]
        row = [name, str(entry["n"]), _fmt(base.get(key), key), _fmt(tuned.get(key), key)]
        if "macro_f1" in tuned:
            row += [_fmt(base.get("macro_f1"), "macro_f1"), _fmt(tuned["macro_f1"], "macro_f1")]
        rows.append(row)
    return rows


def set_headers(report: RunReport) -> list[str]:
    first = next(iter(report.sets.values()))["fine_tuned"]
    key = TASK_METRIC[first["task"]].replace("_", " ")
    headers = ["set", "examples", f"base {key}", f"fine-tuned {key}"]
    return headers + (["base macro-F1", "fine-tuned macro-F1"] if "macro_f1" in first else [])


def side_by_side(report: RunReport) -> list[dict[str, Any]]:
    """One row per test prompt: gold, base answer, fine-tuned answer, and whether each is right."""
    tuned, base = (
        report.tuned["predictions"],
        (report.base or {}).get("predictions") or [None] * len(report.tuned["predictions"]),
    )
    task = report.tuned["task"]
    rows = []
    for index, (after, before) in enumerate(zip(tuned, base)):
        answer = "predicted" if task == "classification" else "output"
        row = {
            "prompt": report.prompts[index] if index < len(report.prompts) else "",
            "gold": after.get("gold", ""),
            "base": before.get(answer, "") if before else "-",
            "tuned": after.get(answer, ""),
        }
        if task == "classification":
            row["base_ok"], row["tuned_ok"] = row["base"] == row["gold"], row["tuned"] == row["gold"]
        elif task == "pattern":
            row["base_ok"], row["tuned_ok"] = bool(before and before.get("score")), bool(after.get("score"))
        else:
            row["base_ok"], row["tuned_ok"] = (
                row["base"].strip() == row["gold"].strip(),
                row["tuned"].strip() == row["gold"].strip(),
            )
        rows.append(row)
    # Show the interesting rows first: where the two models disagree on correctness.
    rows.sort(key=lambda r: (r["base_ok"] == r["tuned_ok"], not r["tuned_ok"]))  # fixed, then broken, then the rest
    return rows[:SIDE_BY_SIDE_ROWS]


def headline_sentence(report: RunReport) -> str:
    key = TASK_METRIC[report.tuned["task"]]
    before = _fmt((report.base or {}).get(key), key)
    after = _fmt(report.tuned[key], key)
    return f"{key.replace('_', ' ')} on {report.tuned['n']} test examples: {before} before, {after} after fine-tuning"


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)
