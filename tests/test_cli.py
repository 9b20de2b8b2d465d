"""The CLI contract, end to end on a tiny model directory."""

import json

import pytest
import yaml

from affinage.cli import main
from tests.conftest import router_config, write_jsonl


@pytest.fixture
def config_path(tmp_path, model_dir):
    config = router_config(tmp_path, model_dir, data={"dataset": "emails.jsonl"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_eval_predict(tmp_path, config_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_path), "--output", str(run), "--quiet", "--set", "trainer.max_steps=5"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["train_tokens_per_second"] > 0 and summary["peak_memory_mb"] > 0
    assert "accuracy" in summary["fine_tuned_test"] and "accuracy" in summary["base_test"]
    assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "checkpoint").exists()
    capsys.readouterr()

    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == "classification" and 0 <= metrics["accuracy"] <= 1

    rows = tmp_path / "ask.jsonl"
    write_jsonl(
        rows,
        [
            {"prompt": "Candidature spontanée"},
            {"instruction": "Classe", "input": "Facture"},
            {"messages": [{"role": "user", "content": "Salut"}]},
        ],
    )
    assert main(["predict", str(run), "--file", str(rows), "--json", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["Candidature spontanée", "Classe\n\nFacture", "Salut"]
    assert all(isinstance(line["output"], str) for line in lines)

    assert main(["compare", str(run), "--output", str(tmp_path / "report" / "router.html")]) == 0
    _check_report(
        tmp_path / "report" / "router.html", n_test=len((run / "data" / "test.jsonl").read_text().splitlines())
    )


def _check_report(path, n_test):
    import base64
    import html.parser
    import re

    page = path.read_text()
    for heading in (
        "The run at a glance",
        "Training curves",
        "Base vs fine-tuned",
        "Confusion matrices",
        "Side by side on test prompts",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert page.count('<table class="cm">') == 2  # base and fine-tuned
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    side = page.split("Side by side on test prompts")[1]
    assert side.count("<tr>") - 1 == min(n_test, 40)  # header row + one per test prompt
    html.parser.HTMLParser().feed(page)  # well-formed enough to parse
    markdown = path.with_suffix(".md").read_text()
    assert "## Confusion matrices" in markdown and (path.parent / "router-curves.png").is_file()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"trainer": {"learnig_rate": 1}}, "trainer.learnig_rate"),
        ({"base_model": "no-such-org/no-such-model"}, "no-such-org/no-such-model"),
        ({"data": {"dataset": "missing.jsonl"}}, "missing.jsonl"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, config_path, capsys, change, expected):
    config = yaml.safe_load(config_path.read_text())
    for key, value in change.items():
        config[key] = (
            {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
        )
    config_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_path), "--output", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "fix:" in err and "Traceback" not in err


def test_malformed_jsonl_names_file_and_line(tmp_path, config_path, capsys):
    (tmp_path / "emails.jsonl").write_text('{"prompt": "a", "completion": "RH"}\n{"prompt": "b" "completion": "RH"}\n')
    assert main(["train", str(config_path), "--output", str(tmp_path / "run"), "--quiet"]) == 2
    assert "emails.jsonl:2" in capsys.readouterr().err


def test_merge_gives_a_plain_transformers_model_with_the_same_generations(tmp_path, config_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from affinage.runner import BasicModelRunner

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(config_path),
                "--output",
                str(run),
                "--quiet",
                "--no-base-eval",
                "--set",
                "trainer.max_steps=4",
            ]
        )
        == 0
    )
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompts = ["Candidature spontanée", "Erreur sur la facture 42"]
    runner = BasicModelRunner(run)
    expected = runner.predict_many(prompts, max_new_tokens=5)
    for prompt, want in zip(prompts, expected):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() == want


def test_qlora_trains_on_a_4bit_base_and_merges_into_full_precision(tmp_path, config_path, capsys):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from affinage.run import open_run as load_run

    run = tmp_path / "qlora"
    assert (
        main(
            [
                "train",
                str(config_path),
                "--output",
                str(run),
                "--quiet",
                "--no-base-eval",
                "--set",
                "quantization.bits=4",
                "--set",
                "trainer.max_steps=6",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == 6 and all(r["loss"] == r["loss"] for r in records)
    quantized = load_run(run)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.model.modules())
    full = load_run(run, quantized=False)  # the adapter trained on NF4 also runs on the fp32 base
    assert not any(type(m).__name__ == "Linear4bit" for m in full.model.modules())
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert "4-bit base was replaced" in capsys.readouterr().out
    assert json.loads((tmp_path / "merged" / "affinage_merge.json").read_text())["dequantized_base"] is True
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.parametrize(
    "prompt",
    [
        {"system": "Tu tries les emails."},
        {"system": ""},
        {"template": "alpaca"},
        {"template": "chatml", "system": "Bref."},
    ],
)
def test_merged_chat_template_renders_what_the_run_trained_on(tmp_path, config_path, capsys, prompt):
    """apply_chat_template of the merged tokenizer == affinage's prompt; --check finds the same generations."""
    from transformers import AutoTokenizer

    from affinage.data.inference import inference_example as to_example
    from affinage.data.template import render_prompt

    run = tmp_path / "run"
    sets = [f"prompt.{key}={json.dumps(value)}" for key, value in prompt.items()]
    assert (
        main(
            [
                "train",
                str(config_path),
                "--output",
                str(run),
                "--quiet",
                "--no-base-eval",
                "--set",
                "trainer.max_steps=2",
                *sum([["--set", s] for s in sets], []),
            ]
        )
        == 0
    )
    rows = tmp_path / "ask.jsonl"
    write_jsonl(
        rows,
        [{"prompt": "Candidature spontanée"}, {"prompt": "Erreur sur la facture 42"}, {"prompt": "Gagnez un iPhone"}],
    )
    assert (
        main(["merge", str(run), "--output", str(tmp_path / "merged"), "--check", str(rows), "--max-new-tokens", "4"])
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["same_greedy_generation"] == 1.0 and report["prompts"] == 3
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    example = to_example("Candidature spontanée")
    ours = render_prompt(tokenizer, example, prompt.get("template"), prompt.get("system"))
    theirs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Candidature spontanée"}], add_generation_prompt=True, tokenize=False
    )
    assert theirs == ours


def test_predict_reads_the_runs_own_input_column(tmp_path, model_dir, capsys):
    rows = [{"email": f"Facture numéro {i} à régler", "service": "Finance"} for i in range(6)] + [
        {"email": f"Candidature au poste {i}", "service": "RH"} for i in range(6)
    ]
    write_jsonl(tmp_path / "mails.jsonl", rows)
    config = {
        "base_model": str(model_dir),
        "adapter": {"r": 2, "alpha": 4, "dropout": 0.0},
        "input_features": [{"name": "email"}],
        "output_features": [{"name": "service", "type": "category"}],
        "data": {"train": "mails.jsonl"},
        "trainer": {"max_steps": 1, "batch_size": 4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(["train", str(tmp_path / "config.yaml"), "--output", str(tmp_path / "run"), "--quiet", "--no-base-eval"])
        == 0
    )
    write_jsonl(tmp_path / "ask.jsonl", [{"email": "Candidature spontanée"}])
    capsys.readouterr()
    assert (
        main(
            ["predict", str(tmp_path / "run"), "--file", str(tmp_path / "ask.jsonl"), "--json", "--max-new-tokens", "2"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt"] == "Candidature spontanée"


@pytest.mark.parametrize(
    "task, key", [("generation", "chrf"), ("pattern", "pattern_score"), ("classification", "accuracy")]
)
def test_eval_json_reports_the_task_metric_of_every_task_kind(tmp_path, config_path, capsys, task, key):
    run = tmp_path / "run"
    sets = ["trainer.max_steps=1", f"eval.task={task}", "eval.max_new_tokens=3", "eval.max_examples=4"] + (
        ["eval.pattern=hearts"] if task == "pattern" else []
    )
    assert (
        main(
            [
                "train",
                str(config_path),
                "--output",
                str(run),
                "--quiet",
                "--no-base-eval",
                *sum([["--set", s] for s in sets], []),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == task and 0 <= metrics[key] <= (100 if key == "chrf" else 1)
    n_test = len((run / "data" / "test.jsonl").read_text().splitlines())
    assert metrics["loss"] > 0 and metrics["perplexity"] >= 1 and len(metrics["predictions"]) == min(4, n_test)
