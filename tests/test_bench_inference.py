"""`affinage bench inference --quick` runs both measurements on the tiny model (no speed asserted)."""

import json

from affinage.bench import main
from affinage.bench.inference_peers import SCORING_PEERS


def test_quick_inference_benchmark_agrees_and_reports_both_sides(capsys, model_dir, tmp_path):
    output = tmp_path / "inference.json"
    argv = ["inference", "--quick", "--model", str(model_dir), "--precision", "fp32", "--json", "--output", str(output)]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == results
    scoring, generation = results["scoring"], results["generation"]
    assert set(scoring["sides"]) == {"affinage", *SCORING_PEERS}
    assert set(generation["sides"]) == {"affinage", "transformers-generate"}
    # The same prompts and labels: every peer picks affinage's label, its log-probs equal up to fp32 rounding.
    assert all(scoring["agreement"][side] >= 0.99 for side in SCORING_PEERS)
    assert all(scoring["max_logprob_difference"][side] < 1e-3 for side in SCORING_PEERS)
    assert generation["agreement"]["transformers-generate"] >= 0.99 and generation["generated_tokens"] > 0
    for block, rate in ((scoring, "examples_per_second"), (generation, "tokens_per_second")):
        for side in block["sides"].values():
            assert side[rate] > 0 and len(side["repeats"]) == 3
    assert results["machine"]["precision"] == "float32" and results["machine"]["matmul_tflops"] > 0
    assert {"torch", "transformers"} <= set(results["versions"]) and "transformers-generate" in results["config"]


def test_the_inference_flag_is_the_subcommand(monkeypatch):
    import affinage.bench.inference as inference

    seen = []
    monkeypatch.setattr(inference, "main", lambda argv: seen.append(argv) or 0)
    assert main(["--inference", "--quick"]) == 0 and main(["inference", "--rows", "4"]) == 0
    assert seen == [["--quick"], ["--rows", "4"]]


def test_the_table_says_when_a_peer_disagrees():
    from affinage.bench.inference import table

    side = {"seconds": 1.0, "fastest": 1.0}
    results = {
        "model": "m",
        "machine": {"device": "cpu", "cpu_features": ["avx2"], "precision": "bfloat16", "matmul_tflops": 0.1},
        "scoring": {
            "sides": {n: {**side, "examples_per_second": 2.0} for n in ("affinage", *SCORING_PEERS)},
            "agreement": {"transformers-per-label": 1.0, "transformers-all-labels": 0.9},
            "ratios": dict.fromkeys(SCORING_PEERS, 1.0),
            "accuracy": dict.fromkeys(("affinage", *SCORING_PEERS), 0.5),
            "rows": 10,
            "labels": ["a", "b"],
            "batch_size": 2,
        },
        "generation": {
            "sides": {n: {**side, "tokens_per_second": 9.0} for n in ("affinage", "transformers-generate")},
            "agreement": {"transformers-generate": 1.0},
            "ratios": {"transformers-generate": 1.0},
            "rows": 10,
            "batch_size": 2,
            "max_new_tokens": 4,
            "generated_tokens": 40,
        },
    }
    text = table(results)
    assert "agreement below 99%" in text and "scoring transformers-all-labels 90.0%" in text
    assert "per-label 100" not in text.splitlines()[-1]
