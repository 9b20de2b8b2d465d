"""Experiment trackers as listeners (``trainer.report_to``): TensorBoard, Weights & Biases, MLflow.

Each logs per step train/loss, train/lr, train/tokens_per_second (and train/grad_norm), and per
validation valid/loss (and valid/score). The tracker's package is imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from affinage.errors import ConfigError
from affinage.training.loop import Listener, StepReport
from affinage.training.state import TrainState


def _require(package: str, pip_name: str) -> Any:
    """Import a tracker's package, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ConfigError(
            f"trainer.report_to lists {pip_name} but {package} cannot be imported ({error})",
            fix=f"pip install {pip_name} (or remove {pip_name} from trainer.report_to)",
        ) from error


def step_scalars(report: StepReport) -> dict[str, float]:
    scalars = {
        "train/loss": report.loss,
        "train/lr": report.lr,
        "train/tokens_per_second": report.tokens / report.seconds,
    }
    if report.grad_norm is not None:
        scalars["train/grad_norm"] = report.grad_norm
    return scalars


def validation_scalars(evaluation: dict) -> dict[str, float]:
    names = {"valid_loss": "valid/loss", "valid_score": "valid/score"}
    return {names[key]: float(value) for key, value in evaluation.items() if key in names}


class TensorBoard(Listener):
    """Event files in ``log_dir``: a fresh run replaces the old ones, a resumed run drops the events after its
    checkpoint's step (as metrics.jsonl does)."""

    def __init__(self, log_dir: Path) -> None:
        _require("tensorboard", "tensorboard")
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def on_start(self, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if state.step == 0:
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=state.step + 1 if state.step else None)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        self._log(step_scalars(report), report.step)

    def on_validation(self, state: TrainState, evaluation: dict) -> None:
        self._log(validation_scalars(evaluation), evaluation["step"])
        self.writer.flush()  # as durable as the checkpoint written next

    def on_end(self, state: TrainState) -> None:
        self.writer.close()


class WandB(Listener):
    """A Weights & Biases run (``pip install wandb``; its login or WANDB_API_KEY, as wandb wants)."""

    def __init__(self, project: str = "affinage", name: str | None = None, config: dict | None = None) -> None:
        self.wandb = _require("wandb", "wandb")
        self.project, self.name, self.config = project, name, config
        self.run: Any = None

    def on_start(self, state: TrainState) -> None:
        self.run = self.wandb.init(project=self.project, name=self.name, config=self.config)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        self.run.log(step_scalars(report), step=report.step)

    def on_validation(self, state: TrainState, evaluation: dict) -> None:
        self.run.log(validation_scalars(evaluation), step=evaluation["step"])

    def on_end(self, state: TrainState) -> None:
        self.run.finish()


class MLflow(Listener):
    """An MLflow run in the tracking store MLflow is configured for (``pip install mlflow``)."""

    def __init__(self, run_name: str | None = None, params: dict | None = None) -> None:
        self.mlflow = _require("mlflow", "mlflow")
        self.run_name, self.params = run_name, params

    def on_start(self, state: TrainState) -> None:
        self.mlflow.start_run(run_name=self.run_name)
        if self.params:
            self.mlflow.log_params(self.params)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        self.mlflow.log_metrics(step_scalars(report), step=report.step)

    def on_validation(self, state: TrainState, evaluation: dict) -> None:
        self.mlflow.log_metrics(validation_scalars(evaluation), step=evaluation["step"])

    def on_end(self, state: TrainState) -> None:
        self.mlflow.end_run()


def reporters(
    report_to: list[str], *, tensorboard_dir: Path | None, run_name: str | None = None, config: dict | None = None
) -> list[Listener]:
    """The listeners ``trainer.report_to`` asks for."""
    listeners: list[Listener] = []
    for name in report_to:
        if name == "tensorboard":
            if tensorboard_dir is None:
                raise ValueError("report_to lists tensorboard: pass tensorboard_dir")
            listeners.append(TensorBoard(tensorboard_dir))
        elif name == "wandb":
            listeners.append(WandB(name=run_name, config=config))
        elif name == "mlflow":
            listeners.append(MLflow(run_name=run_name, params=config))
        else:
            raise ConfigError(f"trainer.report_to: unknown tracker {name!r}", fix="use tensorboard, wandb or mlflow")
    return listeners
