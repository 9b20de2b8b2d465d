"""`affinage bench quality`: the time-to-threshold arithmetic, the probe's stopped clock, and both sides end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from affinage.bench import main
from affinage.bench.quality import summarise, time_to_threshold
from affinage.bench.quality_sides import Probe

PROBES = [
    {"step": 36, "seconds": 40.0, "accuracy": 0.6},
    {"step": 72, "seconds": 70.0, "accuracy": 0.951},
    {"step": 108, "seconds": 100.0, "accuracy": 0.97},
]


def test_time_to_threshold_is_the_first_probe_at_or_above_it():
    assert time_to_threshold(PROBES, 0.95)["step"] == 72
    assert time_to_threshold(PROBES, 0.97)["step"] == 108
    assert time_to_threshold(PROBES, 0.99) is None


def test_ratio_is_the_peers_time_over_affinages_and_a_lower_bound_when_the_peer_never_gets_there():
    peer = [{"step": s, "seconds": 3 * t, "accuracy": a} for s, t, a in ((36, 40, 0.5), (72, 80, 0.96))]
    assert summarise({"affinage": {"probes": PROBES}, "peft-trl": {"probes": peer}}, 0.95)["ratio"] == round(
        240 / 70, 2
    )
    never = summarise({"affinage": {"probes": PROBES}, "peft-trl": {"probes": peer[:1]}}, 0.95)
    assert "ratio" not in never and never["ratio_at_least"] == round(120 / 70, 2)
    assert "ratio" not in summarise({"affinage": {"probes": PROBES[:1]}, "peft-trl": {"probes": peer}}, 0.95)


def test_the_probe_clock_stops_while_it_measures_and_restores_training_mode():
    model = torch.nn.Linear(2, 2).train()

    def slow_scorer(m, examples):
        assert not torch.is_grad_enabled()
        time.sleep(0.3)
        return sum(examples) / len(examples)

    probe = Probe({"a": [1, 1, 0, 0], "b": [1, 1]}, slow_scorer, every=5, threshold=0.6)
    assert [probe.due(s) for s in (0, 4, 5, 10)] == [False, False, True, True]
    assert probe.measure(model, 5)  # (0.5 * 4 + 1.0 * 2) / 6 = 0.667, weighted by set size
    assert model.training and probe.records[0]["accuracy"] == pytest.approx(0.6667, abs=1e-4)
    assert probe.records[0]["sets"] == {"a": 0.5, "b": 1.0} and probe.records[0]["probe_seconds"] >= 0.3
    assert probe.elapsed() < 0.2  # the 0.3 s of measuring is not on the clock


def test_quick_run_trains_both_sides_and_probes_them(capsys):
    assert main(["quality", "--quick", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for name in ("affinage", "peft-trl"):
        side = results["sides"][name]
        assert side["probes"] and side["probes"][0]["step"] == 2, name  # stopped at the first probe (threshold 0)
        assert set(side["probes"][0]["sets"]) == {"heldout", "heldout-short"} and side["peak_memory_mb"] > 0
    assert results["summary"]["ratio"] > 0 and results["versions"]["trl"]


def test_the_probe_logs_each_record_and_stops_a_side_at_its_time_limit(tmp_path):
    log = tmp_path / "probes.jsonl"
    probe = Probe({"a": [0, 0]}, lambda m, e: 0.0, every=1, threshold=0.9, time_limit=3600, log=str(log))
    model = torch.nn.Linear(1, 1)
    assert not probe.measure(model, 1)  # below the threshold, within the time limit: go on
    probe.time_limit = 0.0
    assert probe.measure(model, 2)  # past the time limit: stop, though the threshold was not reached
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
