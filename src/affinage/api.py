"""affinage from Python, in the spirit of seed 000's ``LudwigModel(config).train(...)``.

    import affinage
    run = affinage.train("examples/email-router/config.yaml", output="runs/router", trainer={"epochs": 1})
    run.evaluate()["accuracy"]
    run.predict("Veuillez trouver ci-joint votre facture EDF")
    run.export("router-gguf", format="gguf")
    affinage.load_run("runs/router").push("you/email-router")

The config is a YAML path, a dict (Ludwig's shape) or a :class:`~affinage.config.Config`;
keyword overrides are merged into it section by section (``trainer={"epochs": 1}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from affinage.config import Config, config_from_dict, config_to_dict, load_config
from affinage.run_dir import RunDir


def train(
    config: str | Path | dict[str, Any] | Config,
    output: str | Path,
    *,
    overwrite: bool = False,
    compare_base: bool = True,
    progress: bool = True,
    device: str | None = None,
    **overrides: Any,
) -> Run:
    """Fine-tune as ``config`` says into ``output`` (resumes an interrupted run) and return the run."""
    from affinage.pipeline import run_training
    from affinage.runtime import setup

    resolved = resolve_config(config, overrides)
    run_training(
        resolved, output, compare_base=compare_base, progress=progress, overwrite=overwrite, device=setup(device)
    )
    return Run(output)


def load_run(path: str | Path) -> Run:
    """A trained run directory, ready to evaluate, predict, merge, export or push."""
    RunDir(path).require(adapter=True)
    return Run(path)


def resolve_config(config: str | Path | dict[str, Any] | Config, overrides: dict[str, Any]) -> Config:
    if isinstance(config, Config):
        base = config
    elif isinstance(config, dict):
        base = config_from_dict(config, source="the config dict")
    else:
        base = load_config(config)
    if not overrides:
        return base
    merged = merge_sections(config_to_dict(base), overrides)
    return config_from_dict(merged, source="the config with keyword overrides", base_dir=base.base_dir)


def merge_sections(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``overrides`` merged in: nested dicts key by key, anything else replaced."""
    merged = dict(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


class Run:
    """A run directory written by :func:`train` (or ``affinage train``)."""

    def __init__(self, path: str | Path):
        self.directory = RunDir(path).require()
        self._runner: Any = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def path(self) -> Path:
        return self.directory.path

    @property
    def config(self) -> Config:
        return self.directory.read_config()

    @property
    def summary(self) -> dict[str, Any]:
        """Steps, speed, memory and the base/fine-tuned test metrics of the finished run."""
        return self.directory.read_summary() or {}

    def evaluate(self, data: str | Path | None = None, *, device: str | None = None) -> dict[str, Any]:
        """The task metrics on ``data`` (default: the run's test split)."""
        from affinage.run import evaluate_run
        from affinage.runtime import setup

        return evaluate_run(self.path, data, device=setup(device))

    def predict(self, inputs: str | dict[str, Any] | list[str | dict[str, Any]], max_new_tokens: int | None = None):
        """The answer to a text or a row (prompt, instruction/input, messages); a list gives a list."""
        from affinage.runner import BasicModelRunner

        if self._runner is None:  # the model stays loaded between calls
            self._runner = BasicModelRunner(self.path)
        if isinstance(inputs, list):
            return self._runner.predict_many(inputs, max_new_tokens)
        return self._runner.predict(inputs, max_new_tokens)

    def merge(self, output: str | Path) -> Path:
        """The adapter folded into the base weights: a plain transformers directory."""
        from affinage.export.merge import merge_run

        merge_run(self.path, output)
        return Path(output)

    def export(self, output: str | Path, format: str = "gguf", **options: Any) -> dict[str, Any]:
        """``affinage export``: gguf, gguf-lora, ollama, peft or merged, checked before it is written."""
        from affinage.export.run_export import ExportOptions, export_run

        return export_run(self.path, format, output, ExportOptions(**options))

    def push(self, repo_id: str, what: str = "adapter", **options: Any) -> dict[str, Any]:
        """``affinage push``: that export and its model card to the Hugging Face Hub (``HF_ENDPOINT`` honoured)."""
        from affinage.export.push import push_run

        return push_run(self.path, repo_id, what=what, **options)
