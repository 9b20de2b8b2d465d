"""``affinage compare RUN``: the before/after report of a run, as HTML (self-contained) and Markdown.

It gathers what the run already wrote (config, summary, metrics.jsonl, eval.json, the test
split) and, only when the base model's evaluation is missing, loads the base model to compute
it. Sections: the run at a glance, data, curves, base vs fine-tuned metrics, confusion matrices,
and side-by-side answers on test prompts with mismatches highlighted.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from affinage.atomic import write_file_atomic, write_text_atomic
from affinage.data.inference import inference_example, question_text, row_fields
from affinage.errors import AffinageError
from affinage.report import text_table
from affinage.report.content import (  # the report's content, importable from here as before
    RunReport,
    escape,
    glance_rows,
    headline_sentence,
    metric_rows,
    set_headers,
    set_rows,
    side_by_side,
)
from affinage.report.plots import training_curves_png
from affinage.report.render import render_html, render_markdown
from affinage.run_dir import SPLITS, RunDir

__all__ = [
    "RunReport",
    "escape",
    "gather",
    "glance_rows",
    "headline_sentence",
    "metric_rows",
    "sets_table",
    "side_by_side",
    "write_report",
]


def gather(
    run_dir: Path,
    *,
    compute_missing_base: bool = True,
    device: str | None = None,
    extra_sets: dict[str, str] | None = None,
) -> RunReport:
    """Everything the report shows, from the run directory; ``extra_sets`` add to the config's ``eval.sets``."""
    directory = RunDir(run_dir).require()
    evaluation = directory.read_eval()
    if not evaluation or not evaluation.get("fine_tuned"):
        raise AffinageError(
            f"{run_dir} has no test evaluation (eval.json)",
            fix="give the data a test split and train, or run `affinage eval`",
        )
    base, tuned = evaluation.get("base"), evaluation["fine_tuned"]
    if base is None and compute_missing_base:
        base = _evaluate_base(directory, device)
    config = directory.read_config()
    named_sets = {**config.eval.sets, **(extra_sets or {})}
    sets = _evaluate_sets(directory, named_sets, compute_missing_base, device) if named_sets else {}
    records = directory.read_metrics()
    rows = {name: directory.read_rows(name) for name in SPLITS}
    input_field, templated = row_fields(config)
    name = directory.path.resolve().name
    return RunReport(
        name=name,
        config=directory.read_config_dict(),
        summary=directory.read_summary() or {},
        records=records,
        base=base,
        tuned=tuned,
        prompts=[
            question_text(inference_example(row, input_field=input_field, templated=templated)) for row in rows["test"]
        ],
        splits={split: len(value) for split, value in rows.items()},
        curves_png=training_curves_png(records, title=f"{name}: loss"),
        sets=sets,
    )


def _evaluate_base(directory: RunDir, device: str | None) -> dict[str, Any]:
    """The run was trained with --no-base-eval: evaluate the bare base model now (and keep it)."""
    from affinage.run import evaluate_run
    from affinage.runtime import setup

    base = evaluate_run(directory.path, device=setup(device), with_adapter=False)
    directory.write_eval({**directory.read_eval(), "base": base})
    return base


def _evaluate_sets(
    directory: RunDir, sets: dict[str, str], with_base: bool, device: str | None
) -> dict[str, dict[str, Any]]:
    from affinage.run import evaluate_sets
    from affinage.runtime import setup

    return evaluate_sets(directory.path, sets, device=setup(device), with_base=with_base)


# ---- writers --------------------------------------------------------------------------------


def sets_table(report: RunReport) -> str:
    """The evaluation sets' table for the terminal."""
    return text_table([set_headers(report)] + set_rows(report))


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
