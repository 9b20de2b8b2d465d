"""The comparison report, on a synthetic run directory (no model needed), and in a real browser."""

import json
import shutil
import subprocess

import pytest
import yaml

from affinage.evaluate import classification_metrics
from affinage.report.compare import gather, side_by_side, write_report

LABELS = ["Finance", "RH", "SPAM"]


def _metrics(gold, predicted):
    metrics = classification_metrics(gold, predicted, LABELS)
    metrics.update(
        task="classification",
        method="label scoring",
        examples_per_second=10.0,
        loss=0.5,
        perplexity=1.65,
        predictions=[{"gold": g, "predicted": p} for g, p in zip(gold, predicted)],
    )
    return metrics


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "email-router"
    (run / "data").mkdir(parents=True)
    gold = ["Finance", "RH", "SPAM", "Finance", "RH", "SPAM"]
    rows = [{"prompt": f"email <{i}> about {g}", "completion": g} for i, g in enumerate(gold)]
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "base_model": "tiny",
                "adapter": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                "trainer": {"learning_rate": 0.001, "batch_size": 8, "epochs": 2},
            }
        )
    )
    (run / "summary.json").write_text(
        json.dumps(
            {
                "steps": 30,
                "train_seconds": 12.5,
                "train_tokens_per_second": 321.0,
                "peak_memory_mb": 812.0,
                "best_step": 20,
                "best_valid_loss": 0.41,
            }
        )
    )
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 31)] + [
        {"step": s, "valid_loss": 2.0 / s, "valid_score": s / 30, "best": True} for s in (10, 20, 30)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    base = _metrics(gold, ["SPAM"] * 6)
    tuned = _metrics(gold, ["Finance", "RH", "SPAM", "Finance", "SPAM", "SPAM"])
    (run / "eval.json").write_text(json.dumps({"base": base, "fine_tuned": tuned}))
    return run


def test_side_by_side_puts_disagreements_first(run_dir):
    rows = side_by_side(gather(run_dir, compute_missing_base=False))
    assert len(rows) == 6
    assert [(r["base_ok"], r["tuned_ok"]) for r in rows[:3]] == [(False, True)] * 3  # fixed by fine-tuning
    assert rows[0]["prompt"].startswith("email <")


def test_report_escapes_text_and_writes_markdown(run_dir, tmp_path):
    html_path, markdown_path = write_report(
        gather(run_dir, compute_missing_base=False), tmp_path / "out" / "report.html"
    )
    page = html_path.read_text()
    assert "email &lt;0&gt;" in page and "email <0>" not in page  # user text never becomes markup
    assert "accuracy on 6 test examples: 33.3% before, 83.3% after fine-tuning" in page
    markdown = markdown_path.read_text()
    assert "| accuracy | 33.3% | 83.3% |" in markdown and "![training curves](report-curves.png)" in markdown


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(run_dir, tmp_path):
    from PIL import Image

    html_path, _ = write_report(gather(run_dir, compute_missing_base=False), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colours = {colour for _, colour in image.getcolors(maxcolors=1_000_000)}

    def near(target, tolerance=12):
        return any(all(abs(c - t) <= tolerance for c, t in zip(colour, target)) for colour in colours)

    assert near((0x4C, 0x72, 0xB0)) and near((0xDD, 0x84, 0x52))  # the loss curves were drawn (the PNG decoded)
    assert near((0xE3, 0xF4, 0xE1)) and near((0xFB, 0xE3, 0xE1))  # side-by-side cells: right and wrong


def test_cells_from_data_are_always_escaped():
    from affinage.report.render import Cell, _table

    page = _table(["h"], [["<td><img src=x onerror=alert(1)>"], [Cell("<td>kept</td>")]])
    assert "<img" not in page and "&lt;td&gt;&lt;img" in page and "<td>kept</td>" in page
