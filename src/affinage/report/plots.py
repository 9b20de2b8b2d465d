"""Training curves as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def training_curves_png(records: Sequence[dict[str, Any]], title: str = "") -> bytes | None:
    """Train loss, validation loss and (when logged) the validation task score against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "valid_loss" in r]
    scores = [r for r in evals if "valid_score" in r]
    if not steps:
        return None
    figure, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 6.5, 3.6), squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot(
        [r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", color="#4c72b0", linewidth=1.2
    )
    if evals:
        loss_axis.plot(
            [r["step"] for r in evals], [r["valid_loss"] for r in evals], "o-", label="validation loss", color="#dd8452"
        )
        best = [r for r in evals if r.get("best")]
        if best:
            loss_axis.axvline(best[-1]["step"], color="#55a868", linestyle=":", label=f"best (step {best[-1]['step']})")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (nats / token)")
    loss_axis.set_yscale("log")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    loss_axis.set_title(title or "loss")
    if scores:
        score_axis = axes[0][1]
        score_axis.plot([r["step"] for r in scores], [r["valid_score"] for r in scores], "o-", color="#c44e52")
        score_axis.set_xlabel("optimizer step")
        score_axis.set_ylabel("validation task metric")
        score_axis.set_ylim(0, 1.02)
        score_axis.grid(alpha=0.3)
        score_axis.set_title("task metric on the validation split")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
