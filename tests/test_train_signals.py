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
