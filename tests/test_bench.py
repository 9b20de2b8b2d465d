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


def _scaling_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_cells_hold_examples_of_exactly_the_cell_length(tmp_path, tokenizer):
    from affinage.data.formats import load_examples
    from affinage.data.template import encode_example

    data = _scaling_module().long_prompt_data(tmp_path / "long.jsonl", rows=3, chars=300 * 6)
    encoded = [encode_example(tokenizer, e, 300) for e in load_examples(data)]
    assert [len(e.input_ids) for e in encoded] == [300, 300, 300]
    assert all(
        e.labels[-1] == tokenizer.eos_token_id and e.labels[0] == -100 for e in encoded
    )  # the answer survives the cut


@pytest.mark.integration
def test_quick_scaling_grid_runs(capsys):
    assert _scaling_module().main(["--quick", "--cells", "64x2", "--steps", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] == 64 and row["peft_tokens_per_second"] > 0 and row["affinage_tokens_per_second"] > 0
