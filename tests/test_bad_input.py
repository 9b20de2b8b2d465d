"""The bad-input catalogue (issue 15), one row per input a user gets wrong.

Every row runs the real CLI and pins the contract: exit 2, a message naming the file (and line)
or the key, a ``fix:`` hint, no traceback, and no model loaded. docs/data.md lists the same
catalogue for users.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import affinage.models
import affinage.pipeline
import affinage.run
from affinage.cli import main
from tests.conftest import router_config, router_rows, trained_router, write_jsonl

ENTRY = "import sys; from affinage.cli import main; sys.exit(main())"  # what the `affinage` script runs
GOOD_ROW = json.dumps({"prompt": "Bonjour", "completion": "RH"})


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp, run)`` writes it under ``tmp`` and returns the CLI arguments."""

    name: str
    make: Callable[[Path, Path], list[str]]
    expected: tuple[str, ...]  # all must appear in stderr: the file:line or key, and the cause


def _config(tmp: Path, model_dir: Path, **sections) -> Path:
    """The tiny router config in ``tmp`` (data in ``tmp/emails.jsonl``), ``sections`` merged in."""
    config = router_config(tmp, model_dir, data={"dataset": "emails.jsonl"}, **sections)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(tmp: Path, *extra: str) -> list[str]:
    return ["train", str(tmp / "config.yaml"), "--output", str(tmp / "out"), "--quiet", *extra]


def _with_data(content: str | bytes) -> Callable[[Path, Path], list[str]]:
    """Train on a data file whose content is ``content`` (the config is the good one)."""

    def make(tmp: Path, _run: Path) -> list[str]:
        path = tmp / "emails.jsonl"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        return _train(tmp)

    return make


def _with_row(row: dict) -> Callable[[Path, Path], list[str]]:
    """Train on the good rows with ``row`` as line 3."""
    return _with_data("\n".join([GOOD_ROW, GOOD_ROW, json.dumps(row), GOOD_ROW]) + "\n")


def _with_config(text: str | bytes, name: str = "config.yaml") -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, _run: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
        return ["train", str(path), "--output", str(tmp / "out"), "--quiet"]

    return make


def _with_change(section: str, value: object, *extra: str) -> Callable[[Path, Path], list[str]]:
    """Train with ``config[section]`` changed (a dict merges into the section)."""

    def make(tmp: Path, _run: Path) -> list[str]:
        config = yaml.safe_load((tmp / "config.yaml").read_text())
        config[section] = {**config.get(section, {}), **value} if isinstance(value, dict) else value
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        return _train(tmp, *extra)

    return make


def _split_lonely_label(tmp: Path, _run: Path) -> list[str]:
    rows = router_rows() + [{"prompt": "Une question juridique", "completion": "Juridique"}]
    write_jsonl(tmp / "all.jsonl", rows)
    return ["data", "split", str(tmp / "all.jsonl"), "--out", str(tmp / "splits")]


def _dataset_lonely_label(tmp: Path, _run: Path) -> list[str]:
    write_jsonl(tmp / "emails.jsonl", router_rows() + [{"prompt": "Une question juridique", "completion": "Juridique"}])
    return _train(tmp)


def _output_under_a_file(tmp: Path, _run: Path) -> list[str]:
    (tmp / "somefile").write_text("not a directory\n")
    return ["train", str(tmp / "config.yaml"), "--output", str(tmp / "somefile" / "run"), "--quiet"]


def _eval_broken(tmp: Path, run: Path) -> list[str]:
    (tmp / "broken.jsonl").write_text(GOOD_ROW + '\n{"prompt": "b" "completion": "RH"}\n', encoding="utf-8")
    return ["eval", str(run), "--data", str(tmp / "broken.jsonl")]


def _eval_missing_completion(tmp: Path, run: Path) -> list[str]:
    (tmp / "rows.jsonl").write_text(GOOD_ROW + '\n{"prompt": "b"}\n', encoding="utf-8")
    return ["eval", str(run), "--data", str(tmp / "rows.jsonl")]


CASES = [
    # data files
    Case(
        "broken-json-line", _with_data(GOOD_ROW + '\n{"prompt": "b" "completion": "RH"}\n'), ("emails.jsonl:2", "JSON")
    ),
    Case("missing-completion", _with_row({"prompt": "Bonjour"}), ("emails.jsonl:3", "missing field 'completion'")),
    Case("completion-is-a-list", _with_row({"prompt": "a", "completion": ["RH"]}), ("emails.jsonl:3", "list")),
    Case("prompt-is-an-object", _with_row({"prompt": {"a": 1}, "completion": "RH"}), ("emails.jsonl:3", "'prompt'")),
    Case("row-is-not-an-object", _with_data(GOOD_ROW + "\n[1, 2]\n"), ("emails.jsonl:2", "JSON object")),
    Case("empty-file", _with_data(""), ("emails.jsonl", "empty")),
    Case("blank-lines-only", _with_data("\n  \n\n"), ("emails.jsonl", "empty")),
    Case(
        "not-utf8",
        _with_data(GOOD_ROW.encode() + b'\n{"prompt": "caf\xe9", "completion": "RH"}\n'),
        ("emails.jsonl:2", "UTF-8"),
    ),
    Case(
        "empty-completion",
        _with_row({"prompt": "Bonjour", "completion": "  "}),
        ("emails.jsonl:3", "'completion' is empty"),
    ),
    Case("missing-data-file", _with_change("data", {"dataset": "missing.jsonl"}), ("missing.jsonl", "not found")),
    # the config
    Case(
        "misspelt-key",
        _with_change("trainer", {"learnig_rate": 0.1}),
        ("trainer.learnig_rate", "did you mean 'learning_rate'"),
    ),
    Case("misspelt-section", _with_change("adaptor", {"r": 4}), ("'adaptor'", "did you mean 'adapter'")),
    Case(
        "negative-epochs", _with_change("trainer", {"epochs": -1}), ("config.yaml", "trainer.epochs", "greater than 0")
    ),
    Case(
        "learning-rate-not-a-number",
        _with_change("trainer", {"learning_rate": "fast"}),
        ("trainer.learning_rate", "'fast'"),
    ),
    Case(
        "bad-set-value",
        lambda tmp, run: _train(tmp, "--set", "trainer.batch_size=many"),
        ("trainer.batch_size", "--set trainer.batch_size=many"),
    ),
    Case(
        "set-misspelt-key",
        lambda tmp, run: _train(tmp, "--set", "trainer.epocs=2"),
        ("trainer.epocs", "did you mean 'epochs'", "--set"),
    ),
    Case(
        "set-misspelt-section",
        lambda tmp, run: _train(tmp, "--set", "adaptor.r=4"),
        ("'adaptor' (from --set adaptor.r=4)", "did you mean 'adapter'"),
    ),
    Case("set-without-equals", lambda tmp, run: _train(tmp, "--set", "trainer.epochs"), ("trainer.epochs", "no '='")),
    Case(
        "yaml-syntax-error",
        _with_config("base_model: x\ntrainer:\n  epochs: 2\n lr: [1\n"),
        ("config.yaml:4", "invalid YAML"),
    ),
    Case("config-is-a-list", _with_config("- base_model\n- trainer\n"), ("config.yaml", "mapping")),
    Case(
        "binary-config", _with_config(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00", "model.bin"), ("model.bin", "UTF-8")
    ),
    Case(
        "missing-config",
        lambda tmp, run: ["train", str(tmp / "nope.yaml"), "--output", str(tmp / "out")],
        ("nope.yaml", "not found"),
    ),
    Case(
        "unknown-model",
        _with_change("base_model", "no-such-org/no-such-model"),
        ("no-such-org/no-such-model", "unknown model"),
    ),
    Case(
        "missing-model-path",
        _with_change("base_model", "./models/nothing-here"),
        ("./models/nothing-here", "not found"),
    ),
    # commands
    Case("dataset-label-seen-once", _dataset_lonely_label, ("emails.jsonl:37", "'Juridique' appears only once")),
    Case("split-label-seen-once", _split_lonely_label, ("all.jsonl:37", "'Juridique' appears only once")),
    Case(
        "split-bad-ratios",
        lambda tmp, run: [*_split_lonely_label(tmp, run), "--ratios", "a/b/c"],
        ("--ratios", "'a/b/c'"),
    ),
    Case("output-under-a-file", _output_under_a_file, ("somefile", "cannot write")),
    Case("eval-data-broken", _eval_broken, ("broken.jsonl:2", "JSON")),
    Case("eval-data-missing-completion", _eval_missing_completion, ("rows.jsonl:2", "'completion'")),
    Case(
        "eval-data-missing",
        lambda tmp, run: ["eval", str(run), "--data", str(tmp / "gone.jsonl")],
        ("gone.jsonl", "not found"),
    ),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir) -> Path:
    """One trained tiny run for the ``eval`` rows (trained once, seconds)."""
    return trained_router(tmp_path_factory.mktemp("trained"), model_dir)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: bad input must be caught before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    for module in (affinage.models, affinage.pipeline, affinage.run):
        monkeypatch.setattr(module, "load_base_model", refuse)
    monkeypatch.setattr(affinage.models, "convert_gguf", refuse)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_where_and_fix(case, tmp_path, model_dir, run, no_model_loads, capsys):
    _config(tmp_path, model_dir)
    argv = case.make(tmp_path, run)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("affinage: error: ") and "\n  fix: " in err, err
    for text in case.expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in out + err
    assert not (tmp_path / "out" / "adapter").exists()


def test_bad_input_prints_no_traceback_from_a_real_process(tmp_path, model_dir):
    """The same contract seen from a shell (the console script's entry point in a fresh process)."""
    import os
    import subprocess
    import sys

    _config(tmp_path, model_dir)
    (tmp_path / "emails.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "RH"}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", ENTRY, *_train(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "emails.jsonl:1" in result.stderr and "fix:" in result.stderr and "Traceback" not in result.stderr
