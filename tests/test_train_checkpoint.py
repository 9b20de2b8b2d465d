"""Resume checkpoints: their files and round trip, exact resume mid-epoch, a full disk, non-finite steps."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from affinage.config import TrainerConfig
from affinage.errors import AffinageError, TrainingStopped
from affinage.lora import inject_lora
from affinage.training import BatchPlan, History, Listener, causal_lm_loss, checkpoint, lora_optimizer, run_plan, train
from affinage.training import plan as plan_module
from tests.conftest import tiny_llama
from tests.test_train import TINY_RUN, _encoded, _train
from tests.test_train_parts import _model


def _lora(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k}


def _trained_state(tokenizer, steps=2):
    model, data = _model(tokenizer, dropout=0.1), _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": steps})
    optimizer = lora_optimizer(model, cfg)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=tokenizer.pad_token_id)
    state = run_plan(model, plan, optimizer, cfg, listeners=[History()])
    return model, optimizer, plan, state, cfg


def test_a_checkpoint_round_trip_restores_adapter_optimizer_rng_and_cursor(tokenizer, tmp_path):
    model, optimizer, plan, state, cfg = _trained_state(tokenizer)
    state.best_loss, state.best_step, state.best_score, state.stale = 5.25, 2, 0.75, 1
    saved = checkpoint.save(checkpoint.capture(state, model, optimizer, plan.cursor(state.batches)), tmp_path)
    assert saved.name == "step-000002" and os.listdir(tmp_path) == ["step-000002"]  # no temporary left
    assert sorted(os.listdir(saved)) == ["COMPLETE", "adapter.safetensors", "optimizer.safetensors", "state.json"]
    expected = (torch.rand(5), random.random(), np.random.rand())  # what the run's generators give next

    fresh = _model(tokenizer, dropout=0.1)
    fresh_optimizer = lora_optimizer(fresh, cfg)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # anything: restoring puts them back
    loaded = checkpoint.restore(checkpoint.load(saved), fresh, fresh_optimizer)
    assert (torch.rand(5), random.random(), np.random.rand())[1:] == expected[1:]
    assert (loaded.step, loaded.batches, loaded.tokens, loaded.seconds) == (2, 2, state.tokens, state.seconds)
    assert (loaded.best_loss, loaded.best_step, loaded.best_score, loaded.stale) == (5.25, 2, 0.75, 1)
    assert [r["step"] for r in loaded.metrics] == [1, 2]
    assert json.loads((saved / "state.json").read_text())["cursor"] == {"epoch": 0, "position": 2, "batches": 2}
    for key, tensor in _lora(model).items():
        assert torch.equal(dict(fresh.named_parameters())[key], tensor)
    restored = fresh_optimizer.state_dict()
    for index, moments in optimizer.state_dict()["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(restored["state"][index][key], tensor)


def test_the_newest_complete_checkpoint_is_read_and_the_last_k_are_kept(tokenizer, tmp_path):
    model, optimizer, plan, state, _ = _trained_state(tokenizer)
    for step in (2, 3, 4):
        state.step = step
        checkpoint.save(checkpoint.capture(state, model, optimizer, plan.cursor(step)), tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-000003", "step-000004"]
    (tmp_path / "step-000009").mkdir()  # killed while writing, marker never written
    (tmp_path / "step-000009" / "state.json").write_text("{half")
    assert checkpoint.latest(tmp_path).name == "step-000004"
    with pytest.raises(AffinageError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "step-000009")


EXACT = {**TINY_RUN, "max_steps": 10, "eval_every": 4, "save_every": 5}  # 3 batches per epoch: step 5 is mid-epoch


class Crash(Exception):
    pass


def _run(tokenizer, run_dir, loss_fn=causal_lm_loss, upper=False, **overrides):
    model = _model(tokenizer, dropout=0.1)  # dropout: the RNG state matters
    if upper:  # LoRA on blocks 2-3 of 4: blocks 0-1 frozen, their states computed as batches need them
        model = tiny_llama(len(tokenizer), seed=0, layers=4)
        torch.manual_seed(0)
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, layers=2)
    return _train(tokenizer, run_dir, model=model, base=EXACT, loss_fn=loss_fn, **overrides)


def _step_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records if "loss" in r]


@pytest.mark.parametrize("how, upper", [("crash", False), ("signal", False), ("crash", True)])
def test_a_run_stopped_mid_epoch_resumes_exactly(tokenizer, tmp_path, monkeypatch, how, upper):
    """Stopped after step 5 (not a validation, mid-epoch) then resumed: same losses for 6-10, same adapter.

    ``upper``: the frozen-prefix states come in windows of ~2 batches, so the resumed run computes
    its windows at other steps than the straight one (and the windows of steps 1-5 not at all)."""
    monkeypatch.setattr(plan_module, "prefix_windows", functools.partial(plan_module.prefix_windows, tokens=60))
    straight, straight_result = _run(tokenizer, tmp_path / "straight", upper=upper)
    assert straight_result.frozen_prefix_cached == upper
    calls = {"n": 0}

    def stops(model, batch):
        calls["n"] += 1  # steps 1-4, one validation batch, step 5 = call 6, step 6 = call 7
        if how == "signal" and calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 5, checkpoints it, stops
        if how == "crash" and calls["n"] == 7:
            raise Crash  # dies in step 6: step 5's checkpoint (save_every) is the newest
        return causal_lm_loss(model, batch)

    with pytest.raises(TrainingStopped if how == "signal" else Crash) as stopped:
        _run(tokenizer, tmp_path / "resumed", loss_fn=stops, upper=upper)
    if how == "signal":
        assert stopped.value.exit_code == 128 + signal.SIGTERM and "SIGTERM after step 5" in str(stopped.value)
    assert checkpoint.latest(tmp_path / "resumed" / "checkpoint").name == "step-000005"
    resumed, result = _run(tokenizer, tmp_path / "resumed", upper=upper)
    assert result.steps == 10 and [r["step"] for r in result.history if "loss" in r] == list(range(1, 11))
    assert _step_records(tmp_path / "resumed") == _step_records(tmp_path / "straight")
    for key, tensor in _lora(straight).items():
        assert torch.equal(dict(resumed.named_parameters())[key], tensor), key


def test_a_checkpoint_of_another_training_split_is_refused(tokenizer, tmp_path):
    calls = {"n": 0}

    def crashes(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash
        return causal_lm_loss(model, batch)

    with pytest.raises(Crash):
        _run(tokenizer, tmp_path, loss_fn=crashes)  # checkpoint after step 5: epoch 1, batch 2 of 3
    model, data = _model(tokenizer), _encoded(tokenizer)[:8]  # 2 batches per epoch now
    cfg = TrainerConfig(**EXACT)
    with pytest.raises(AffinageError, match="training split of another size"):
        train(model, data, data[:4], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path, base_model_name="t")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tokenizer, tmp_path, monkeypatch):
    real = checkpoint.save_file

    def disk_full(tensors, path):
        if ".step-000004." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(AffinageError, match=r"no space left.*step-000002 is intact") as error:
        _run(tokenizer, tmp_path, save_every=2, eval_every=20)
    assert "resume from step 2" in str(error.value)
    assert os.listdir(tmp_path / "checkpoint") == ["step-000002"]  # no half-written directory left
    assert checkpoint.load(tmp_path / "checkpoint" / "step-000002")["state"]["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert _run(tokenizer, tmp_path, save_every=2, eval_every=20)[1].steps == 10


class Weights(Listener):
    """The LoRA factors after each step."""

    def __init__(self, model) -> None:
        self.model, self.after = model, {}

    def on_step(self, state, report) -> None:
        self.after[state.step] = _lora(self.model)


def _run_with_nan(tokenizer, nan_at, *, kind="loss", **overrides):
    """Plan + loop; the loss (or one LoRA factor's gradient) is NaN at the steps in ``nan_at``."""
    model, data = _model(tokenizer), _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": 6, **overrides})
    optimizer = lora_optimizer(model, cfg)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss, n = causal_lm_loss(m, batch)
        return (loss * float("nan"), n) if kind == "loss" and calls["n"] in nan_at else (loss, n)

    if kind == "gradient":
        factor = next(p for k, p in model.named_parameters() if "lora_B" in k)
        factor.register_hook(lambda grad: grad * float("nan") if calls["n"] in nan_at else grad)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=tokenizer.pad_token_id, loss_fn=loss_fn)
    history, weights = History(), Weights(model)
    state = run_plan(model, plan, optimizer, cfg, listeners=[history, weights])
    return state, history, weights


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_counted(tokenizer, kind):
    state, history, weights = _run_with_nan(tokenizer, {3, 5}, kind=kind)
    assert state.step == 6 and state.nonfinite_steps == 2 and state.nonfinite_streak == 0
    skipped = {r["step"]: r for r in history.records if r.get("skipped")}
    assert set(skipped) == {3, 5} and all(r["loss"] is None for r in skipped.values())
    assert skipped[3]["skipped"] == f"non-finite {kind}"
    for step in (3, 5):  # no update on a skipped step
        for key, tensor in weights.after[step - 1].items():
            assert torch.equal(weights.after[step][key], tensor)
    assert all(torch.isfinite(t).all() for t in weights.after[6].values())
    assert any(not torch.equal(weights.after[4][k], t) for k, t in weights.after[3].items())  # step 4 trains


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_step_and_causes(tokenizer):
    with pytest.raises(TrainingStopped) as stopped:
        _run_with_nan(tokenizer, {2, 3, 4, 5, 6}, max_nonfinite_steps=3)
    message = str(stopped.value)
    assert "steps 2-4" in message and "stopped at step 4" in message
    assert "learning rate" in message and "fp16" in message and "bad data" in message
