"""`affinage bench --quick` runs both sides end to end on a tiny model (it asserts nothing about speed)."""

import json

import pytest

from affinage.bench import main


@pytest.mark.integration
def test_quick_benchmark_runs_both_sides(capsys):
    assert main(["--quick", "--steps", "2", "--seq-len", "96", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for side in ("peft", "affinage"):
        assert results[side]["steps"] == 2 and results[side]["tokens"] > 0 and results[side]["peak_memory_mb"] > 0
        assert results[side]["held_out_loss"] > 0
    # The same data, model and seed: both start from the same loss (random LoRA A, zero B).
    assert results["affinage"]["held_out_loss"] == pytest.approx(results["peft"]["held_out_loss"], rel=0.05)
    assert set(results["ratios"]) == {"tokens_per_second", "peak_memory", "held_out_loss"}
