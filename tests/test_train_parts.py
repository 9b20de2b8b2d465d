"""The training package's rooms on their own: the loop without files, the state's round trip, the trackers."""

from __future__ import annotations

import gc
import json
import os
import sys

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.errors import ConfigError
from affinage.lora import inject_lora
from affinage.training import (
    BatchPlan,
    History,
    Listener,
    lora_optimizer,
    lr_schedule,
    run_plan,
    run_steps,
    train,
    validation,
)
from tests.conftest import tiny_llama
from tests.test_train import TINY_RUN, _encoded


def _model(tokenizer, dropout=0.0):
    model = tiny_llama(len(tokenizer), seed=0)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)
    return model


class FrozenDuringSteps(Listener):
    """Whether the objects alive before training were frozen out of collections at each step."""

    def __init__(self):
        self.seen = []

    def on_step(self, state, report):
        self.seen.append(gc.get_freeze_count() > 0)


def test_the_loop_writes_no_file(tokenizer, tmp_path, monkeypatch):
    """Steps, validations and listeners that only keep things in memory: the working directory stays empty."""
    monkeypatch.chdir(tmp_path)
    model, data = _model(tokenizer, dropout=0.1), _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": 4, "eval_every": 2})
    torch.manual_seed(cfg.seed)
    optimizer = lora_optimizer(model, cfg)
    plan = BatchPlan.build(model, data, data[:4], cfg, pad_id=tokenizer.pad_token_id)
    history, frozen = History(), FrozenDuringSteps()
    state = run_steps(
        model,
        plan.batches(),
        plan.train_loss_fn,
        optimizer,
        steps=plan.total_steps,
        lr_at=lr_schedule(cfg, plan.total_steps),
        validate=validation(plan, torch.device("cpu")),
        eval_every=plan.eval_every,
        listeners=[history, frozen],
    )
    assert state.step == 4 and state.batches == 4 and state.tokens > 0
    assert [r["step"] for r in history.records if "valid_loss" in r] == [2, 4]
    assert os.listdir(tmp_path) == []
    assert frozen.seen == [True] * 4 and gc.get_freeze_count() == 0  # the collector skipped the model; thawed


def test_plan_and_loop_give_the_recipe_s_losses(tokenizer, tmp_path):
    """What bench does (plan + loop, no run directory) trains exactly as train(run_dir=...)."""
    cfg = TrainerConfig(**TINY_RUN)
    data = _encoded(tokenizer)
    result = train(
        _model(tokenizer), data, [], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path, base_model_name="t"
    )
    model = _model(tokenizer)
    torch.manual_seed(cfg.seed)
    optimizer = lora_optimizer(model, cfg)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=tokenizer.pad_token_id)
    history = History()
    run_plan(model, plan, optimizer, cfg, listeners=[history])
    strip = [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in history.records]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in result.history]


def test_tensorboard_gets_the_logged_losses(tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": 4, "eval_every": 2, "report_to": ["tensorboard"]})
    train(_model(tokenizer), data, data[:4], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path, base_model_name="t")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_second", "valid/loss"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert list(logged) == [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert list(logged.values()) == pytest.approx([r["loss"] for r in records if "loss" in r], abs=1e-5)
    valid = {e.step: e.value for e in events.Scalars("valid/loss")}
    assert valid == pytest.approx({r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}, abs=1e-5)
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([r["lr"] for r in records if "lr" in r], rel=1e-6)


def test_a_tracker_that_is_not_installed_says_how_to_install_it(monkeypatch, tmp_path):
    from affinage.training import reporters

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match="pip install wandb"):
        reporters(["wandb"], tensorboard_dir=None)
    assert reporters([], tensorboard_dir=None) == []


def test_report_to_accepts_only_known_trackers():
    assert TrainerConfig().report_to == []
    assert TrainerConfig(report_to=["tensorboard", "mlflow"]).report_to == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError):
        TrainerConfig(report_to=["comet"])
