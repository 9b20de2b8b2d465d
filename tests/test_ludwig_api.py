"""Seed 000's Python flow (``LudwigModel``) and datasets as Ludwig takes them: files, DataFrames, hf://, ludwig://.

Every dataset is read offline: ``hf://`` from a ``datasets`` cache built here the way ``load_dataset``
leaves it, ``ludwig://alpaca`` from a Ludwig cache folder laid out as Ludwig's loaders lay it out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from affinage import LudwigModel
from affinage.cli import main
from affinage.data.sources import reference_rows
from affinage.errors import AffinageError, DataError
from affinage.upload import main as upload_main
from tests.conftest import SEED_000_CONFIG, router_config, router_rows, write_jsonl
from tests.export.test_push import hub  # noqa: F401  (the local Hub fixture)

pd = pytest.importorskip("pandas")

ALPACA = [
    {"instruction": f"Donne la couleur numéro {i}", "input": "" if i % 2 else f"liste {i}", "output": color}
    for i, color in enumerate(["rouge", "vert", "bleu", "jaune"] * 5)
]


# Seed 000's config (its indentation restored), the base model swapped for the tiny model and two
# lines added for a test's budget: trainer.max_steps/batch_size/max_seq_len.
SEED_CONFIG = SEED_000_CONFIG + "  max_steps: 2\n  batch_size: 4\n  max_seq_len: 96\n"


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty Ludwig, datasets and affinage caches of this test's own."""
    monkeypatch.setenv("LUDWIG_CACHE", str(tmp_path / "ludwig-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("AFFINAGE_CACHE", str(tmp_path / "affinage-cache"))
    import affinage.data.sources as sources

    monkeypatch.setattr(sources, "_loaded", {})  # references are read once per process: not across tests


def ludwig_alpaca(cache: Path, rows: list[dict], *, processed: bool = False) -> Path:
    """Alpaca where Ludwig keeps it: ``alpaca_1.0/raw/alpaca_data.json``, or ``processed/alpaca.parquet``."""
    if processed:
        path = cache / "alpaca_1.0" / "processed" / "alpaca.parquet"
        path.parent.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(path)
    else:
        path = cache / "alpaca_1.0" / "raw" / "alpaca_data.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def hf_cache(cache: Path, dataset_id: str, splits: dict[str, list[dict]], config: str = "default") -> None:
    """A Hub dataset as ``load_dataset(dataset_id)`` leaves it in HF_DATASETS_CACHE: prepared Arrow files under
    ``namespace___name/CONFIG/0.0.0/COMMIT`` (what the offline ``load_dataset`` reads back)."""
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json

    sources = cache.parent / f"{dataset_id.replace('/', '_')}-{config}-files"
    sources.mkdir(parents=True)
    files = {name: str(write_jsonl(sources / f"{name}.jsonl", rows)) for name, rows in splits.items()}
    datasets.disable_progress_bars()
    builder = Json(
        cache_dir=str(cache.parent / "build"),
        dataset_name=dataset_id.split("/")[-1],
        config_name=config,
        data_files=files,
    )
    builder.download_and_prepare()
    target = cache / dataset_id.replace("/", "___") / config / "0.0.0" / ("0" * 40)
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


@pytest.fixture
def seed_model(tmp_path, model_dir, monkeypatch):
    """Seed 000's Python flow, as the seed writes it: train on ludwig://alpaca, save to results."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    ludwig_alpaca(tmp_path / "ludwig-cache", ALPACA)
    import logging

    config_str = SEED_CONFIG.format(model=model_dir)
    config = yaml.safe_load(config_str)
    model = LudwigModel(config=config, niveau_de_journalisation=logging.INFO)
    results = model.train(dataset="ludwig://alpaca")

    model.save("results")
    return model, results


def test_seed_000_flow_trains_saves_loads_and_predicts(seed_model, tmp_path):
    model, results = seed_model
    train_stats, preprocessed_data, output_directory = results
    assert output_directory == str((tmp_path / "results" / "api_experiment_run").resolve())
    assert len(train_stats.training["combined"]["loss"]) == 2 and "output" in train_stats.test
    assert sum(len(split) for split in preprocessed_data[:3]) == len(ALPACA)  # split 80/10/10 as the config says
    assert yaml.safe_load(Path(output_directory, "config.yaml").read_text())["data"]["dataset"] == "ludwig://alpaca"

    loaded = LudwigModel.load("results")  # model.save("results") wrote a run there
    frame = pd.DataFrame(ALPACA[:3])
    predictions, _ = loaded.predict(frame)
    assert list(predictions.columns) == ["output_predictions", "output_response"] and len(predictions) == 3
    assert predictions["output_response"].tolist() == model.predict(frame)[0]["output_response"].tolist()
    eval_stats, rows, _ = loaded.evaluate(frame, collect_predictions=True)
    assert eval_stats["output"]["n"] == 3 and eval_stats["combined"]["loss"] > 0
    assert rows["output"].tolist() == ["rouge", "vert", "bleu"] and "output_response" in rows

    again = model.train(dataset="ludwig://alpaca")  # Ludwig's numbering: a new folder per train()
    assert Path(again.output_directory).name == "api_experiment_run_0"


def test_a_yaml_string_config_and_a_dataframe_dataset(tmp_path, model_dir):
    config = router_config(tmp_path, model_dir, trainer={"max_steps": 2})
    del config["data"]
    model = LudwigModel(yaml.safe_dump(config))  # Ludwig's docs pass the YAML text itself
    frame = pd.DataFrame(router_rows())
    results = model.train(dataset=frame, output_directory=tmp_path / "out", compare_base=False)
    dataset = yaml.safe_load(Path(results.output_directory, "config.yaml").read_text())["data"]["dataset"]
    assert dataset.startswith(str(tmp_path / "affinage-cache" / "datasets" / "table-"))  # named by its content
    assert pd.read_json(dataset, lines=True).equals(frame)
    resumed = model.train(dataset=frame.copy(), model_resume_path=results.output_directory, compare_base=False)
    assert resumed.output_directory == results.output_directory  # same table, same config: the finished run
    predictions, _ = model.predict(["Candidature spontanée", {"prompt": "Erreur sur la facture"}], return_type=dict)
    assert len(predictions["completion_response"]) == 2


def test_training_validation_and_test_sets_are_used_as_given(tmp_path, model_dir):
    rows = router_rows()
    config = router_config(tmp_path, model_dir, trainer={"max_steps": 2})
    del config["data"]
    model = LudwigModel(config)
    results = model.train(
        training_set=pd.DataFrame(rows[:30]),
        validation_set=write_jsonl(tmp_path / "valid.jsonl", rows[30:33]),
        test_set=rows[33:],
        output_directory=tmp_path / "out",
        compare_base=False,
    )
    train, valid, test, metadata = results.preprocessed_data
    assert (len(train), len(valid), len(test)) == (30, 3, 3) and metadata["task"] == "classification"
    with pytest.raises(DataError, match="validation_set= without training_set="):
        model.train(validation_set=rows)
    with pytest.raises(DataError, match="both dataset= and training_set=") as error:
        model.train(dataset=rows, training_set=rows)
    assert "fix:" in str(error.value)


def test_cli_dataset_flag_trains_on_the_file_split_as_the_config_says(tmp_path, model_dir, capsys):
    config = router_config(tmp_path, model_dir, trainer={"max_steps": 2}, data={"split": {"ratios": [70, 15, 15]}})
    file = config["data"].pop("dataset")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "run"
    argv = ["train", str(tmp_path / "config.yaml"), "--output", str(output), "--quiet", "--no-base-eval"]
    assert main([*argv, "--dataset", file]) == 0
    written = yaml.safe_load((output / "config.yaml").read_text())["data"]
    assert written["dataset"] == str(Path(file).resolve()) and written["split"]["ratios"] == [70, 15, 15]
    splits = [len((output / "data" / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "valid", "test")]
    assert sum(splits) == 36 and splits[0] < 30  # 70 %, not the default 80 %


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--dataset", "missing.jsonl"], "--dataset: data file not found: missing.jsonl"),
        (["--dataset", "hf://someone/missing"], "--dataset: hf://someone/missing is not in the local Hugging Face"),
        (["--training-set", "ludwig://alpaca"], "--training-set: ludwig://alpaca is not in Ludwig's dataset cache"),
        (["--test-set", "x.jsonl"], "--test-set: --test-set without --training-set"),
        (["--dataset", "a.jsonl", "--training-set", "b.jsonl"], "both --dataset and --training-set"),
    ],
)
def test_cli_dataset_errors_exit_2_before_anything_loads(tmp_path, model_dir, capsys, flags, said):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"base_model": str(model_dir)}))
    output = tmp_path / "run"
    assert main(["train", str(tmp_path / "config.yaml"), "--output", str(output), *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "fix:" in err and "Traceback" not in err
    assert not output.exists()  # refused before the run directory (and so before any model)


def test_hf_datasets_load_offline_from_the_local_cache(tmp_path, model_dir, capsys):
    rows = router_rows()
    cache = tmp_path / "hf-datasets"
    hf_cache(cache, "someone/emails", {"train": rows[:30], "validation": rows[30:33], "test": rows[33:]})
    hf_cache(cache, "someone/alpaca-mini", {"train": ALPACA}, config="fr")

    assert len(reference_rows("hf://someone/emails", "dataset", "t")) == 36  # every split, to split again
    assert [r for _, r in reference_rows("hf://someone/emails", "valid", "t")] == rows[30:33]
    assert len(reference_rows("hf://someone/alpaca-mini--fr", "train", "t")) == len(ALPACA)  # ID--SUBSET
    assert reference_rows("hf://someone/alpaca-mini--fr", "test", "t") == []  # no test split: none

    config = router_config(tmp_path, model_dir, trainer={"max_steps": 2})
    del config["data"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "run"
    flags = ["--training-set", "hf://someone/emails", "--validation-set", "hf://someone/emails"]
    flags += ["--test-set", "hf://someone/emails"]
    argv = ["train", str(tmp_path / "config.yaml"), "--output", str(output), "--quiet", "--no-base-eval", *flags]
    assert main(argv) == 0
    assert [json.loads(line) for line in (output / "data" / "test.jsonl").read_text().splitlines()] == rows[33:]
    assert yaml.safe_load((output / "config.yaml").read_text())["data"]["train"] == "hf://someone/emails"


def test_a_missing_hf_dataset_names_the_download_command(tmp_path):
    with pytest.raises(DataError) as error:
        LudwigModel({"base_model": "smollm2-135m-instruct"}).train(dataset="hf://someone/absent--sub")
    text = str(error.value)
    assert text.startswith("dataset=: hf://someone/absent--sub is not in the local Hugging Face datasets cache")
    assert "datasets.load_dataset('someone/absent', 'sub')" in text


def test_ludwig_alpaca_missing_then_present_as_ludwig_lays_it_out(tmp_path):
    with pytest.raises(DataError) as error:
        reference_rows("ludwig://alpaca", "dataset", "dataset=")
    text = str(error.value)
    assert "alpaca_1.0/raw/alpaca_data.json" in text and "curl -L -o" in text and "stanford_alpaca" in text
    cache = tmp_path / "ludwig-cache"
    ludwig_alpaca(cache, [{**row, "split": i % 3} for i, row in enumerate(ALPACA)], processed=True)
    assert len(reference_rows("ludwig://alpaca", "dataset", "x")) == len(ALPACA)
    test = reference_rows("ludwig://alpaca", "test", "x")  # Ludwig's split column: 2 is test
    assert [row for _, row in test] == [row for i, row in enumerate(ALPACA) if i % 3 == 2]
    assert "split" not in test[0][1]


def test_predict_before_training_and_unknown_arguments_are_clear(tmp_path, model_dir):
    model = LudwigModel({"base_model": str(model_dir)})
    with pytest.raises(AffinageError, match="not trained"):
        model.predict(["x"])
    with pytest.raises(AffinageError, match="unexpected arguments: epochs"):
        model.train(dataset=router_rows(), epochs=2)
    with pytest.raises(AffinageError, match="holds no trained affinage run"):
        LudwigModel.load(tmp_path)


@pytest.fixture
def trained(tmp_path, model_dir):
    config = router_config(tmp_path, model_dir, trainer={"max_steps": 2})
    results = LudwigModel(config).train(output_directory=tmp_path / "results", compare_base=False)
    return Path(results.output_directory)


def test_upload_dry_run_and_a_real_push_to_the_local_hub(trained, hub, capsys):  # noqa: F811
    argv = ["hf_hub", "--repo_id", "someone/router", "--model_path", str(trained)]
    assert upload_main([*argv, "--dry-run"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n---")[0])
    assert {f["path"] for f in listed["files"]} >= {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert hub.commits == []

    assert LudwigModel.upload_to_hf_hub("someone/router", trained / "model", commit_message="from seed 000") is True
    (commit,) = hub.commits  # Ludwig's `.../model` form finds the run above it
    assert commit["repo"] == "someone/router" and commit["header"]["summary"] == "from seed 000"
    assert (
        commit["files"]["adapter_model.safetensors"] == (trained / "adapter" / "adapter_model.safetensors").read_bytes()
    )

    assert upload_main([*argv, "-c", "again", "-d", "why"]) == 0
    assert hub.commits[-1]["header"]["description"] == "why" and "pushed 4 files to" in capsys.readouterr().out


def test_upload_errors_exit_2_naming_the_flag(tmp_path, trained, capsys):
    assert upload_main(["hf_hub", "--repo_id", "a/b", "--model_path", str(tmp_path / "nothing")]) == 2
    assert "--model_path: " in capsys.readouterr().err
    assert upload_main(["hf_hub", "-r", "a/b", "-m", str(trained), "-t", "dataset", "--dry-run"]) == 2
    assert "--repo_type: repo_type 'dataset'" in capsys.readouterr().err
