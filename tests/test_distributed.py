"""Many processes through torchrun (gloo, one thread each): the same training as one process, rank 0 writing,
and a run that survives a killed worker or a SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from affinage import distributed
from affinage.data.template import Encoded
from affinage.training.plan import micro_batches
from tests.conftest import router_config

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 180  # seconds for one torchrun: two processes importing torch and training a tiny model
STEPS = 120


def _env() -> dict[str, str]:
    path = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "AFFINAGE_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(config: Path, run: Path, *extra: str, processes: int = 2, mode: str = "ddp") -> list[str]:
    """``torchrun --standalone`` (a free port of its own) on ``affinage train``, ``trainer.distributed`` = ``mode``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *extra]
    train = ["train", str(config), "--output", str(run), "--quiet", "--no-base-eval"]
    return [*launcher, "-m", "affinage", *train, "--set", f"trainer.distributed={mode}"]


def _config(directory: Path, model_dir: Path, dropout: float = 0.0, **trainer) -> Path:
    settings = {"max_steps": STEPS, "eval_every": 40, "save_every": 10, **trainer}
    config = router_config(directory, model_dir, trainer=settings, adapter={"dropout": dropout})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if '"loss"' in line]


def _finish(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


# --- sharing the batches -------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_the_shares_of_each_batch_make_the_global_batch(processes):
    data = [Encoded([1] * (3 + i % 7), [1] * (3 + i % 7), truncated=False) for i in range(10)]
    streams = [micro_batches(data, 4, seed=0, pad_id=0, share=(rank, processes)) for rank in range(processes)]
    single = micro_batches(data, 4, seed=0, pad_id=0)
    for _ in range(6):  # two epochs: 3 batches each, the last of 2 rows (an empty share with 3 processes)
        epoch, whole = next(single)
        shares = [next(stream) for stream in streams]
        assert {e for e, _ in shares} == {epoch}
        rows = sorted(i for _, batch in shares if batch for i in batch["indices"].tolist())
        assert rows == sorted(whole["indices"].tolist())


def test_unshard_puts_the_shares_back_in_order():
    items = list(range(11))
    shares = [items[rank::3] for rank in range(3)]
    assert distributed.unshard(shares, len(items)) == items
    assert distributed.map_shards(lambda part: [x * 2 for x in part], items) == [x * 2 for x in items]  # one process


# --- a hand-launched gloo group: the loop's gradients and skips ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group(processes: int, nan_rank: int) -> list[dict]:
    """tests/distributed_worker.py in ``processes`` processes of one gloo group; their JSON reports by rank."""
    port, root = _free_port(), SRC.parent
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(nan_rank)],
            cwd=root,
            env={
                **_env(),
                "PYTHONPATH": f"{SRC}{os.pathsep}{root}",
                **{"RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)},
                **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    reports = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=TIMEOUT)
        assert worker.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.splitlines()[-1]))
    return reports


def test_a_nan_on_one_process_is_skipped_by_all_and_the_gradient_is_the_one_process_one():
    (single,) = _group(1, nan_rank=0)  # one process: its step 2 is NaN, skipped
    pair = _group(2, nan_rank=1)  # two processes: only rank 1's half of step 2 is NaN
    for report in pair:
        assert [s["skipped"] for s in report["steps"]] == [None, "loss", None, None]  # all agree to skip
        assert report["steps"][0]["loss"] == pytest.approx(single["steps"][0]["loss"], rel=1e-6)
        assert report["steps"][0]["grad_norm"] == pytest.approx(single["steps"][0]["grad_norm"], rel=1e-5)
        for mine, reference in zip(report["steps"][2:], single["steps"][2:]):
            assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert pair[0]["weights"] == pair[1]["weights"]  # one model: every process made the same updates
    assert pair[0]["weights"] == pytest.approx(single["weights"], rel=1e-3)


# --- torchrun, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, model_dir, mode):
    """The global batch is split, the loss normalised by all processes' tokens: the one-process run's losses,
    with a whole model in each process (ddp) or its weights sharded across them (fsdp)."""
    config = _config(tmp_path, model_dir, max_steps=12, eval_every=6)
    _finish(_torchrun(config, tmp_path / "one", processes=1))
    two = _finish(_torchrun(config, tmp_path / "two", mode=mode))
    one_steps, two_steps = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert [r["step"] for r in two_steps] == list(range(1, 13))  # one record per step: only rank 0 writes
    for a, b in zip(one_steps, two_steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a, b)
    valid = [[r["valid_loss"] for r in _records(tmp_path / name) if "valid_loss" in r] for name in ("one", "two")]
    assert len(valid[1]) == 2 and valid[1] == pytest.approx(valid[0], rel=1e-3)  # the split validation, gathered
    one_adapter, two_adapter = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    # Adam divides by the gradient's own size, so summation-order noise in near-zero gradients (B starts
    # at zero, so A's first gradients are) becomes whole lr-sized steps: a loose check, the losses are the test.
    for key, tensor in one_adapter.items():
        assert float((two_adapter[key] - tensor).norm() / tensor.norm()) < 5e-2, key
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 12 and "accuracy" in summary["fine_tuned_test"]
    assert two.stdout.count("trained 12 steps") == 1  # rank 0 speaks for the run


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker of ``rank`` among the launcher's children (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under {launcher.pid}")


def _wait_for_steps(process: subprocess.Popen, run: Path, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while len(_steps(run)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """Two processes, dropout on (each draws its own masks: their RNG states must resume too), never stopped;
    one run per ``trainer.distributed`` mode, made when a test first asks for it."""
    runs: dict[str, Path] = {}

    def run(mode: str) -> Path:
        if mode not in runs:
            directory = tmp_path_factory.mktemp(f"straight-{mode}")
            _finish(_torchrun(_config(directory, model_dir, dropout=0.1), directory / "run", mode=mode))
            runs[mode] = directory / "run"
        return runs[mode]

    return run


def _same_run(run: Path, reference: Path) -> None:
    assert [r["step"] for r in _steps(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in _steps(run)] == [r["loss"] for r in _steps(reference)]
    expected = _adapter(reference)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in _adapter(run).items())


def test_a_killed_worker_under_max_restarts_resumes_and_finishes(tmp_path, model_dir, uninterrupted):
    """SIGKILL of rank 1 mid-run: torchrun restarts both workers, which continue from the newest checkpoint."""
    config, run = _config(tmp_path, model_dir, dropout=0.1), tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(config, run, "--max-restarts=1"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_steps(launcher, run, 25)
    os.kill(_worker(launcher, 1), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, stderr[-4000:]
    assert "resuming the interrupted run" in stdout
    _same_run(run, uninterrupted("ddp"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_torchrun_checkpoints_every_worker_and_the_same_command_resumes(
    tmp_path, model_dir, uninterrupted, mode
):
    """Under fsdp the checkpoint gathers the sharded adapter and moments, and resuming cuts them up again."""
    config, run = _config(tmp_path, model_dir, dropout=0.1), tmp_path / "run"
    command = _torchrun(config, run, mode=mode)
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(launcher, run, 15)
    sent = time.monotonic()
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    _, stderr = launcher.communicate(timeout=30)
    assert time.monotonic() - sent < 30 and launcher.returncode != 0
    done = len(_steps(run))
    assert "stopped by SIGTERM" in stderr and done < STEPS
    assert (run / "checkpoint" / f"step-{done:06d}" / "COMPLETE").is_file()  # the step it stopped after
    _finish(command)
    _same_run(run, uninterrupted(mode))


def test_fsdp_with_a_4_bit_base_is_refused_before_the_model_loads(tmp_path, model_dir, monkeypatch):
    from affinage import pipeline
    from affinage.config import config_from_dict
    from affinage.errors import ConfigError

    config = router_config(tmp_path, model_dir, trainer={"distributed": "fsdp"}, quantization={"bits": 4})
    monkeypatch.setattr(distributed, "active", lambda: True)  # as under torchrun
    monkeypatch.setattr(pipeline, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="cannot shard a 4-bit"):
        pipeline.run_training(config_from_dict(config, base_dir=tmp_path), tmp_path / "run", log=lambda _: None)
