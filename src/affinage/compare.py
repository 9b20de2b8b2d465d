"""``affinage compare RUN``: the before/after report of a run, as HTML (self-contained) and Markdown.

It gathers what the run already wrote (config, summary, metrics.jsonl, eval.json, the test
split) and, only when the base model's evaluation is missing, loads the base model to compute
it. Sections: the run at a glance, data, curves, base vs fine-tuned metrics, confusion matrices,
and side-by-side answers on test prompts with mismatches highlighted.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from affinage.atomic import write_file_atomic, write_text_atomic
from affinage.compare_content import (  # the report's content, importable from here as before
    RunReport,
    escape,
    glance_rows,
    headline_sentence,
    metric_rows,
    side_by_side,
)
from affinage.compare_render import render_html, render_markdown
from affinage.errors import AffinageError
from affinage.plots import training_curves_png

__all__ = [
    "RunReport",
    "escape",
    "gather",
    "glance_rows",
    "headline_sentence",
    "metric_rows",
    "side_by_side",
    "write_report",
]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _prompt_text(row: dict[str, Any]) -> str:
    if "messages" in row:
        return next((m.get("content", "") for m in reversed(row["messages"]) if m.get("role") == "user"), "")
    if "instruction" in row:
        return (row["instruction"] + ("\n" + row["input"] if row.get("input") else "")).strip()
    return str(row.get("prompt") or row.get("text") or next((v for v in row.values() if isinstance(v, str)), ""))


def gather(run_dir: Path, *, compute_missing_base: bool = True) -> RunReport:
    """Everything the report shows, from the run directory."""
    import yaml

    if not (run_dir / "config.yaml").is_file():
        raise AffinageError(
            f"{run_dir} is not an affinage run (no config.yaml)", fix="pass the --output directory of `affinage train`"
        )
    evaluation = _read_json(run_dir / "eval.json")
    if not evaluation or not evaluation.get("fine_tuned"):
        raise AffinageError(
            f"{run_dir} has no test evaluation (eval.json)",
            fix="give the data a test split and train, or run `affinage eval`",
        )
    base, tuned = evaluation.get("base"), evaluation["fine_tuned"]
    if base is None and compute_missing_base:
        base = _evaluate_base(run_dir)
    records_path = run_dir / "metrics.jsonl"
    records = (
        [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
        if records_path.is_file()
        else []
    )
    rows = {}
    for name in ("train", "valid", "test"):
        path = run_dir / "data" / f"{name}.jsonl"
        rows[name] = (
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if path.is_file()
            else []
        )
    return RunReport(
        name=run_dir.resolve().name,
        config=yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")),
        summary=_read_json(run_dir / "summary.json") or {},
        records=records,
        base=base,
        tuned=tuned,
        prompts=[_prompt_text(row) for row in rows["test"]],
        splits={name: len(value) for name, value in rows.items()},
        curves_png=training_curves_png(records, title=f"{run_dir.resolve().name}: loss"),
    )


def _evaluate_base(run_dir: Path) -> dict[str, Any]:
    """The run was trained with --no-base-eval: evaluate the bare base model now (and keep it)."""
    from affinage.pipeline import evaluate_examples, set_threads
    from affinage.run import load_run, write_json

    set_threads()
    run = load_run(run_dir, with_adapter=False)
    base = evaluate_examples(run.model, run.tokenizer, run.examples(), run.task, run.config, run.prompting)
    evaluation = _read_json(run_dir / "eval.json")
    write_json(run_dir / "eval.json", {**evaluation, "base": base})
    return base


# ---- writers --------------------------------------------------------------------------------


def write_report(report: RunReport, output: Path) -> tuple[Path, Path]:
    """``output`` (.html, self-contained) and its Markdown twin (.md, curves in a PNG beside it)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    png_name = output.with_suffix("").name + "-curves.png"
    curves_uri = "data:image/png;base64," + base64.b64encode(report.curves_png).decode() if report.curves_png else None
    write_text_atomic(output, render_html(report, curves_uri))
    markdown = output.with_suffix(".md")
    if report.curves_png:
        png = report.curves_png
        write_file_atomic(output.parent / png_name, lambda tmp: Path(tmp).write_bytes(png))
    write_text_atomic(markdown, render_markdown(report, png_name if report.curves_png else None))
    return output, markdown
