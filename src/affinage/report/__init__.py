"""Text reports for the terminal: one run's metrics, and base vs fine-tuned side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TASK_METRIC = {"classification": "accuracy", "generation": "chrf", "pattern": "pattern_score"}


def task_metric(metrics: dict[str, Any]) -> float:
    """The one number a task is judged by, higher is better, in [0, 1]."""
    value = float(metrics[TASK_METRIC[metrics["task"]]])
    return value / 100 if metrics["task"] == "generation" else value


def headline(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    if metrics["task"] == "generation":
        return f"chrF {metrics['chrf']:.1f}"
    return f"{metrics[TASK_METRIC[metrics['task']]]:.1%}"


def confusion_text(metrics: dict[str, Any]) -> str:
    matrix = metrics["confusion_matrix"]
    lines = [
        "confusion matrix (rows: gold, columns: predicted)",
        " " * 12 + " ".join(f"{c[:10]:>10}" for c in matrix["columns"]),
    ]
    lines += [
        f"{label[:12]:<12}" + " ".join(f"{v:>10}" for v in row)
        for label, row in zip(matrix["labels"], matrix["matrix"])
    ]
    return "\n".join(lines)


def _loss_text(metrics: dict[str, Any]) -> str:
    return f"  loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}" if "loss" in metrics else ""


def metrics_text(metrics: dict[str, Any]) -> str:
    """What `affinage eval` prints."""
    where = f"({metrics['n']} examples, {metrics['method']}, {metrics['examples_per_second']} examples/s)"
    if metrics["task"] == "generation":
        return (
            f"exact match {metrics['exact_match']:.1%}  chrF {metrics['chrf']:.1f}  "
            f"words {metrics['mean_output_words']} "
            f"(reference {metrics['mean_reference_words']}){_loss_text(metrics)}  {where}"
        )
    if metrics["task"] == "pattern":
        return (
            f"{metrics['pattern']} pattern {metrics['pattern_score']:.1%}  "
            f"words {metrics['mean_output_words']}{_loss_text(metrics)}  {where}"
        )
    lines = [f"accuracy {metrics['accuracy']:.1%}  macro-F1 {metrics['macro_f1']:.3f}{_loss_text(metrics)}  {where}"]
    if "coverage" in metrics:
        lines.append(
            f"  answered {metrics['coverage']:.1%} of examples (abstain threshold), "
            f"accuracy when answered {metrics['answered_accuracy']:.1%}"
        )
    for label, stats in metrics["per_class"].items():
        lines.append(
            f"  {label:<12} precision {stats['precision']:.3f}  recall {stats['recall']:.3f}  "
            f"F1 {stats['f1']:.3f}  n={stats['support']}"
        )
    lines.append(confusion_text(metrics))
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns for the terminal, the first one a header underlined with dashes."""
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def comparison_table(base: dict[str, Any] | None, tuned: dict[str, Any]) -> str:
    """Before/after table for the terminal."""
    rows = [("metric", "base", "fine-tuned")]
    if tuned["task"] == "classification":
        rows.append(("accuracy", f"{base['accuracy']:.1%}" if base else "-", f"{tuned['accuracy']:.1%}"))
        rows.append(("macro F1", f"{base['macro_f1']:.3f}" if base else "-", f"{tuned['macro_f1']:.3f}"))
        for label, stats in tuned["per_class"].items():
            before = base["per_class"][label]["f1"] if base else None
            rows.append((f"F1 {label}", f"{before:.3f}" if before is not None else "-", f"{stats['f1']:.3f}"))
    elif tuned["task"] == "generation":
        rows.append(("chrF", f"{base['chrf']:.1f}" if base else "-", f"{tuned['chrf']:.1f}"))
        rows.append(("exact match", f"{base['exact_match']:.1%}" if base else "-", f"{tuned['exact_match']:.1%}"))
    else:
        rows.append((f"{tuned['pattern']} pattern", headline(base), headline(tuned)))
    if "loss" in tuned:
        rows.append(("test loss", f"{base['loss']:.3f}" if base and "loss" in base else "-", f"{tuned['loss']:.3f}"))
    lines = [text_table(rows)]
    lines.append(f"({tuned['n']} test examples; {tuned['method']})")
    if tuned["task"] == "classification":
        lines += ["", "fine-tuned " + confusion_text(tuned)]
    return "\n".join(lines)
