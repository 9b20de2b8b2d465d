"""Rendering of the comparison report: one self-contained HTML page and its Markdown twin."""

from __future__ import annotations

from typing import Any

from affinage.report.content import (
    RunReport,
    escape,
    glance_rows,
    headline_sentence,
    metric_rows,
    set_headers,
    set_rows,
    side_by_side,
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;\
color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.lead{font-size:1.15rem;color:#444} table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.3rem .55rem;vertical-align:top;text-align:left} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums} .ok{background:#e3f4e1} .bad{background:#fbe3e1}
.matrices{display:flex;gap:2rem;flex-wrap:wrap} .cm td{text-align:center;min-width:3.2rem}
.prompt{max-width:420px;white-space:pre-wrap;font-size:.9rem;color:#333} img{max-width:100%}
"""


class Cell(str):
    """A cell already written as ``<td ...>`` markup (its text escaped by whoever built it)."""


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(cell if isinstance(cell, Cell) else f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _confusion_html(title: str, matrix: dict[str, Any]) -> str:
    peak = max([max(row) for row in matrix["matrix"]] + [1])
    rows = []
    for label, counts in zip(matrix["labels"], matrix["matrix"]):
        cells = [Cell(f"<td><b>{escape(label)}</b></td>")]
        for column, count in zip(matrix["columns"], counts):
            hue = "46,125,50" if column == label else "198,40,40"  # diagonal green, errors red
            alpha = 0.08 + 0.8 * count / peak if count else 0
            cells.append(Cell(f'<td style="background:rgba({hue},{alpha:.2f})">{count}</td>'))
        rows.append(cells)
    return f"<div><h3>{escape(title)}</h3>" + _table(["gold \\ predicted"] + matrix["columns"], rows, "cm") + "</div>"


def render_html(report: RunReport, curves_uri: str | None) -> str:
    parts = [f"<h1>affinage — {escape(report.name)}</h1>", f'<p class="lead">{escape(headline_sentence(report))}</p>']
    parts += ["<h2>The run at a glance</h2>", _table(["", ""], [[k, v] for k, v in glance_rows(report)])]
    parts.append("<h2>Training curves</h2>")
    parts.append(f'<img alt="training curves" src="{curves_uri}">' if curves_uri else "<p>No training records.</p>")
    parts += [
        "<h2>Base vs fine-tuned</h2>",
        _table(["metric", "base", "fine-tuned"], [list(r) for r in metric_rows(report)]),
        f"<p>{escape(report.tuned['method'])}</p>",
    ]
    if report.sets:
        parts += [
            "<h2>Evaluation sets (never trained on)</h2>",
            _table(set_headers(report), set_rows(report)),
        ]
    if report.tuned["task"] == "classification":
        matrices = [("base model", report.base), ("fine-tuned model", report.tuned)]
        parts.append(
            "<h2>Confusion matrices</h2><div class='matrices'>"
            + "".join(_confusion_html(title, m["confusion_matrix"]) for title, m in matrices if m)
            + "</div>"
        )
    rows = []
    for row in side_by_side(report):
        rows.append(
            [
                Cell(f'<td class="prompt">{escape(row["prompt"][:600])}</td>'),
                row["gold"][:300],
                Cell(f'<td class="{"ok" if row["base_ok"] else "bad"}">{escape(row["base"][:300])}</td>'),
                Cell(f'<td class="{"ok" if row["tuned_ok"] else "bad"}">{escape(row["tuned"][:300])}</td>'),
            ]
        )
    parts += [
        "<h2>Side by side on test prompts</h2>",
        "<p>Green: right (or pattern respected); red: wrong. Rows where the two models differ come first.</p>",
        _table(["prompt", "expected", "base", "fine-tuned"], rows),
    ]
    body = "\n".join(parts)
    head = f'<meta charset="utf-8"><title>affinage report — {escape(report.name)}</title><style>{CSS}</style>'
    return f'<!doctype html>\n<html lang="en"><head>{head}</head>\n<body>\n{body}\n</body></html>\n'


def _md_cell(text: Any) -> str:
    return escape(str(text)).replace("|", "\\|").replace("\n", " ")[:300]  # Markdown renders inline HTML


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows])


def render_markdown(report: RunReport, curves_file: str | None) -> str:
    parts = [
        f"# affinage — {report.name}",
        "",
        headline_sentence(report),
        "",
        "## The run at a glance",
        "",
        _md_table(["", ""], [list(r) for r in glance_rows(report)]),
        "",
        "## Training curves",
        "",
    ]
    parts += [f"![training curves]({curves_file})" if curves_file else "No training records.", ""]
    parts += [
        "## Base vs fine-tuned",
        "",
        _md_table(["metric", "base", "fine-tuned"], [list(r) for r in metric_rows(report)]),
        "",
        report.tuned["method"],
        "",
    ]
    if report.sets:
        parts += ["## Evaluation sets (never trained on)", "", _md_table(set_headers(report), set_rows(report)), ""]
    if report.tuned["task"] == "classification":
        parts += ["## Confusion matrices (rows: gold, columns: predicted)", ""]
        for title, metrics in (("base model", report.base), ("fine-tuned model", report.tuned)):
            if metrics:
                matrix = metrics["confusion_matrix"]
                parts += [
                    f"### {title}",
                    "",
                    _md_table(
                        ["gold \\ predicted"] + matrix["columns"],
                        [[label] + counts for label, counts in zip(matrix["labels"], matrix["matrix"])],
                    ),
                    "",
                ]
    rows = [
        [
            r["prompt"],
            r["gold"],
            ("✅ " if r["base_ok"] else "❌ ") + r["base"],
            ("✅ " if r["tuned_ok"] else "❌ ") + r["tuned"],
        ]
        for r in side_by_side(report)
    ]
    parts += ["## Side by side on test prompts", "", _md_table(["prompt", "expected", "base", "fine-tuned"], rows), ""]
    return "\n".join(parts)
