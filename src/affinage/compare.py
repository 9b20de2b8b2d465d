"""``affinage compare RUN``: the before/after report of a run, as HTML (self-contained) and Markdown.

It gathers what the run already wrote (config, summary, metrics.jsonl, eval.json, the test
split) and, only when the base model's evaluation is missing, loads the base model to compute
it. Sections: the run at a glance, data, curves, base vs fine-tuned metrics, confusion matrices,
and side-by-side answers on test prompts with mismatches highlighted.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affinage.atomic import write_file_atomic, write_text_atomic
from affinage.data.inference import inference_example, question_text, row_fields
from affinage.errors import AffinageError
from affinage.plots import training_curves_png
from affinage.report import TASK_METRIC
from affinage.run_dir import SPLITS, RunDir

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


def gather(run_dir: Path, *, compute_missing_base: bool = True, device: str | None = None) -> RunReport:
    """Everything the report shows, from the run directory."""
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
    records = directory.read_metrics()
    rows = {name: directory.read_rows(name) for name in SPLITS}
    input_field, templated = row_fields(directory.read_config())
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
    )


def _evaluate_base(directory: RunDir, device: str | None) -> dict[str, Any]:
    """The run was trained with --no-base-eval: evaluate the bare base model now (and keep it)."""
    from affinage.run import open_run
    from affinage.runtime import setup
    from affinage.task import evaluate_examples

    run = open_run(directory.path, with_adapter=False, device=setup(device))
    base = evaluate_examples(run.model, run.tokenizer, run.examples(), run.task, run.config, run.prompting)
    directory.write_eval({**directory.read_eval(), "base": base})
    return base


# ---- shared content -------------------------------------------------------------------------


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
            f"lr {trainer.get('learning_rate')}, batch {trainer.get('batch_size')}, epochs {trainer.get('epochs')}, max_seq_len {trainer.get('max_seq_len')}",
        ),
        (
            "data",
            f"{report.splits['train']} train / {report.splits['valid']} valid / {report.splits['test']} test rows",
        ),
        (
            "training",
            f"{s.get('steps', '-')} steps in {_fmt(s.get('train_seconds'))} s, {_fmt(s.get('train_tokens_per_second'))} tokens/s, "
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
    return f"{key.replace('_', ' ')} on {report.tuned['n']} test examples: {before} before, {_fmt(report.tuned[key], key)} after fine-tuning"


# ---- writers --------------------------------------------------------------------------------


def write_report(report: RunReport, output: Path) -> tuple[Path, Path]:
    """``output`` (.html, self-contained) and its Markdown twin (.md, curves in a PNG beside it)."""
    from affinage.compare_render import render_html, render_markdown

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


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)
