"""Named evaluation sets: ``eval.sets`` and ``compare --data``, base vs fine-tuned, cached by content."""

import json

import pytest

import affinage.run
from affinage.cli import main
from affinage.errors import AffinageError
from affinage.run import evaluate_run, evaluate_sets
from tests.conftest import trained_router, write_jsonl

UNSEEN = [  # emails of no training row (a copy would be refused as leakage)
    ("Votre offre de stage m'intéresse beaucoup", "RH"),
    ("Attestation employeur à me renvoyer", "RH"),
    ("Écran noir après la mise à jour", "Support"),
    ("La facture de mars est fausse", "Finance"),
    ("Remboursement du trop-perçu", "Finance"),
    ("Le scanner refuse les badges", "Support"),
]


def unseen_rows(indices) -> list[dict]:
    return [
        {"prompt": f'[INST] rediriger l\'email suivant : "{UNSEEN[i][0]}"[/INST]', "completion": UNSEEN[i][1]}
        for i in indices
    ]


@pytest.fixture
def run(tmp_path, model_dir):
    write_jsonl(tmp_path / "short.jsonl", unseen_rows(range(4)))
    return trained_router(
        tmp_path,
        model_dir,
        "--no-base-eval",
        trainer={"max_steps": 3, "eval_every": 3},
        eval={"sets": {"short": "short.jsonl"}},  # relative to the config file
    )


def test_compare_reports_config_and_extra_sets_base_vs_fine_tuned(run, tmp_path, capsys):
    write_jsonl(tmp_path / "other.jsonl", unseen_rows([3, 4, 5]))
    assert main(["compare", str(run), "--data", f"other={tmp_path / 'other.jsonl'}"]) == 0
    printed = capsys.readouterr().out
    assert "short" in printed and "other" in printed and "fine-tuned accuracy" in printed
    sets = json.loads((run / "eval.json").read_text())["sets"]
    assert set(sets) == {"short", "other"}
    for name, file in (("short", "short.jsonl"), ("other", "other.jsonl")):
        entry = sets[name]
        assert entry["n"] == len((tmp_path / file).read_text().splitlines())
        # the same numbers `affinage eval --data` gives, with and without the adapter
        assert entry["fine_tuned"]["accuracy"] == evaluate_run(run, tmp_path / file)["accuracy"]
        assert entry["base"]["accuracy"] == evaluate_run(run, tmp_path / file, with_adapter=False)["accuracy"]
    markdown = (run / "report.md").read_text()
    assert "## Evaluation sets (never trained on)" in markdown and "| short |" in markdown


def test_sets_are_evaluated_again_only_when_their_file_changes(run, tmp_path, monkeypatch):
    file = tmp_path / "short.jsonl"
    first = evaluate_sets(run, {"short": file})
    monkeypatch.setattr(affinage.run, "open_run", lambda *a, **k: pytest.fail("a cached set loaded the model"))
    assert evaluate_sets(run, {"short": file}) == first
    write_jsonl(file, unseen_rows([0, 2, 3, 5]))
    monkeypatch.undo()
    assert evaluate_sets(run, {"short": file})["short"]["sha256"] != first["short"]["sha256"]


def test_a_missing_set_file_is_named(run, tmp_path):
    with pytest.raises(AffinageError, match="evaluation set 'gone'.*does not exist"):
        evaluate_sets(run, {"gone": tmp_path / "nope.jsonl"})
