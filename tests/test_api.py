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


def test_a_run_in_use_is_refused_and_a_dead_processes_lock_taken_over(tmp_path, config):
    import os
    import subprocess

    output = tmp_path / "run"
    output.mkdir()
    (output / ".lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(AffinageError, match=f"in use by process {os.getppid()}"):
        affinage.train(config, output=output, progress=False, compare_base=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (output / ".lock").write_text(str(dead.pid))  # its process is gone: the lock is stale
    run = affinage.train(config, output=output, progress=False, compare_base=False)
    assert run.summary["steps"] == 4 and not (output / ".lock").exists()


def test_an_unwritable_output_fails_before_the_model_loads(tmp_path, config, monkeypatch):
    from affinage import pipeline

    monkeypatch.setattr(pipeline, "load_base_model", lambda *a, **k: pytest.fail("loaded a model for nothing"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(AffinageError, match="cannot write to"):
        affinage.train(config, output=tmp_path / "a-file" / "run", progress=False)
