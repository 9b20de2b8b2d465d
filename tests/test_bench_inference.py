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
