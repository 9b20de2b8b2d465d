"""The Python API (seed 000's LudwigModel shape) and the run directory's protection of finished runs."""

import pytest

import affinage
from affinage.cli import main
from affinage.errors import AffinageError
from tests.conftest import router_config


@pytest.fixture
def config(tmp_path, model_dir):
    return router_config(tmp_path, model_dir, trainer={"max_steps": 4, "eval_every": 2})


def test_train_returns_a_run_that_evaluates_predicts_and_merges(tmp_path, config):
    run = affinage.train(config, output=tmp_path / "run", progress=False, trainer={"max_steps": 3})
    assert isinstance(run, affinage.Run) and run.summary["steps"] == 3  # the keyword override won
    assert run.config.trainer.batch_size == 4  # the rest of the section kept
    metrics = run.evaluate()
    assert metrics["accuracy"] == run.summary["fine_tuned_test"]["accuracy"]
    answer = run.predict("Candidature spontanée pour un stage")
    assert isinstance(answer, str) and run.predict(["a", {"prompt": "b"}], max_new_tokens=2).__len__() == 2
    merged = affinage.load_run(tmp_path / "run").merge(tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


def test_load_run_refuses_what_is_not_a_trained_run(tmp_path):
    with pytest.raises(AffinageError, match="not an affinage run"):
        affinage.load_run(tmp_path)


def test_a_finished_run_of_another_config_is_never_overwritten_silently(tmp_path, config, capsys):
    output = tmp_path / "run"
    affinage.train(config, output=output, progress=False, compare_base=False)
    adapter = (output / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AffinageError, match=r"finished run of another config \(trainer.max_steps: 4 -> 2\)"):
        affinage.train(config, output=output, progress=False, trainer={"max_steps": 2})
    assert (output / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # nothing lost
    assert (output / "summary.json").is_file()
    run = affinage.train(config, output=output, progress=False, overwrite=True, trainer={"max_steps": 2})
    assert run.summary["steps"] == 2


def test_the_same_finished_config_does_nothing(tmp_path, config, capsys):
    output = tmp_path / "run"
    affinage.train(config, output=output, progress=False, compare_base=False)
    stamp = (output / "metrics.jsonl").stat().st_mtime_ns
    affinage.train(config, output=output, progress=False, compare_base=False)
    out = capsys.readouterr().out
    assert "already holds this finished run: nothing to do" in out and "accuracy" in out  # the stored results
    assert (output / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_cli_train_refuses_then_overwrites(tmp_path, config, capsys):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    output = str(tmp_path / "run")
    assert main(["train", str(path), "--output", output, "--quiet", "--no-base-eval"]) == 0
    assert main(["train", str(path), "--output", output, "--quiet", "--set", "trainer.max_steps=2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", str(path), "--output", output, "--quiet", "--overwrite", "--set", "trainer.max_steps=2"]) == 0
