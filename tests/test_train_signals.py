"""SIGTERM or SIGINT to a running `affinage train`: a checkpoint within 30 s, a non-zero exit saying how to resume, then
the same command finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from affinage.cli import main
from affinage.training import checkpoint
from tests.conftest import router_config

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 200


def _step_lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if '"loss"' in line]


def _wait_for_steps(process: subprocess.Popen, run: Path, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(_step_lines(run)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_exits_and_the_same_command_resumes(tmp_path, model_dir, signum):
    trainer = {"max_steps": STEPS, "eval_every": 1000, "save_every": None}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(router_config(tmp_path, model_dir, trainer=trainer)))
    run = tmp_path / "run"
    argv = ["train", str(config), "--output", str(run), "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "AFFINAGE_THREADS": "1"}
    code = "import sys; from affinage.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_steps(process, run, 5)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)  # torchelastic's grace period before SIGKILL
    print(f"{signum.name} to exit: {time.monotonic() - sent:.2f} s")
    assert process.returncode == 128 + signum, stderr
    assert (
        f"stopped by {signum.name}" in stderr and "run the same `affinage train" in stderr and "Traceback" not in stderr
    )
    done = len(_step_lines(run))
    assert 5 <= done < STEPS and checkpoint.latest(run / "checkpoint").name == f"step-{done:06d}"
    assert not (run / ".lock").exists()

    assert main(argv) == 0  # the same command again
    assert [r["step"] for r in _step_lines(run)] == list(range(1, STEPS + 1))
    assert (run / "summary.json").is_file() and not (run / "checkpoint").exists()


# --- SIGKILL: no chance to checkpoint; the newest complete checkpoint is all there is ------------------------------

KILL_STEPS = 40
# Written into the child: after a checkpoint's files are written (still under their temporary name, before the
# rename that completes it), say so and wait, so the test's SIGKILL lands in the middle of a checkpoint write.
SLOW_WRITE = """
import os, time
from affinage.training import checkpoint
write = checkpoint._write_files
def slow(saved, directory):
    write(saved, directory)
    if saved["state"]["step"] >= int(os.environ["PAUSE_AT_STEP"]):
        open(os.environ["PAUSE_FLAG"], "w").close()
        time.sleep(60)
checkpoint._write_files = slow
"""


def _kill_config(directory: Path, model_dir: Path) -> list[str]:
    """A run with dropout (its RNG must resume too), checkpoints every 7 steps, validation every 15."""
    trainer = {"max_steps": KILL_STEPS, "eval_every": 15, "save_every": 7}
    config = router_config(directory, model_dir, trainer=trainer, adapter={"dropout": 0.1})
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", str(directory / "config.yaml"), "--output", str(directory / "run"), "--quiet", "--no-base-eval"]


def _child(argv: list[str], prelude: str = "", **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    code = prelude + "\nimport sys\nfrom affinage.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env={**environment, "AFFINAGE_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_to_end(argv: list[str]) -> None:
    process = _child(argv)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, model_dir) -> Path:
    directory = tmp_path_factory.mktemp("straight")
    _run_to_end(_kill_config(directory, model_dir))
    return directory / "run"


def _assert_same_run(run: Path, reference: Path) -> None:
    assert [r["step"] for r in _step_lines(run)] == list(range(1, KILL_STEPS + 1))
    assert [r["loss"] for r in _step_lines(run)] == [r["loss"] for r in _step_lines(reference)]
    adapter = "adapter/adapter_model.safetensors"
    assert (run / adapter).read_bytes() == (reference / adapter).read_bytes()  # bit-identical


# Written into the child: once step PAUSE_AT_STEP is logged, say so and wait for the test's SIGKILL.
PAUSE_AFTER_STEP = """
import os, time
from affinage.training import listeners
log = listeners.MetricsLog.on_step
def paused(self, state, report):
    log(self, state, report)
    if state.step == int(os.environ["PAUSE_AT_STEP"]):
        open(os.environ["PAUSE_FLAG"], "w").close()
        time.sleep(60)
listeners.MetricsLog.on_step = paused
"""


def _kill_when_paused(process: subprocess.Popen, flag: Path) -> None:
    deadline = time.monotonic() + 180
    while not flag.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.kill()
    process.communicate(timeout=30)


def test_sigkill_between_checkpoints_then_the_same_command_gives_the_same_adapter(tmp_path, model_dir, straight_run):
    argv = _kill_config(tmp_path, model_dir)
    flag = tmp_path / "paused"
    process = _child(argv, PAUSE_AFTER_STEP, PAUSE_AT_STEP="18", PAUSE_FLAG=str(flag))
    _kill_when_paused(process, flag)  # after step 18: checkpoints at 7, 14 and 15 (validation), the next at 21
    assert len(_step_lines(tmp_path / "run")) == 18
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "run" / "checkpoint")) == 15  # steps 16-18 are lost
    _run_to_end(argv)  # the same command: back to the newest checkpoint, the steps after it again
    _assert_same_run(tmp_path / "run", straight_run)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resumes_exactly(
    tmp_path, model_dir, straight_run
):
    argv = _kill_config(tmp_path, model_dir)
    flag = tmp_path / "writing"
    process = _child(argv, SLOW_WRITE, PAUSE_AT_STEP="21", PAUSE_FLAG=str(flag))
    _kill_when_paused(process, flag)  # step 21's files are written, its directory not yet renamed into place
    root = tmp_path / "run" / "checkpoint"
    assert any(p.name.startswith(".step-000021") for p in root.iterdir())  # the half-written one
    assert checkpoint.step_of(checkpoint.latest(root)) == 15  # the previous complete one (the validation's)
    _run_to_end(argv)
    _assert_same_run(tmp_path / "run", straight_run)
