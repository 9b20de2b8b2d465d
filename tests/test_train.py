import json

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.batching import collate
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.lora import inject_lora, lora_modules, mark_only_lora_as_trainable
from affinage.training import causal_lm_loss, full_logits_loss, get_lr, train
from tests.conftest import EMAILS, adapted_tiny, tiny_gemma3, tiny_llama, trainable_grads


def test_get_lr_warmup_then_cosine_to_zero():
    assert get_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert get_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert get_lr(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert get_lr(100, 100, 1.0, 10) == pytest.approx(0.0)
    assert get_lr(55, 100, 1.0, 10, "linear") == pytest.approx(0.5)
    assert get_lr(80, 100, 1.0, 10, "constant") == 1.0


def _encoded(tokenizer, n=12):
    examples = [Example(prompt=text, completion=label) for label, texts in EMAILS.items() for text in texts][:n]
    return [encode_example(tokenizer, e, 128) for e in examples]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_head_on_labels_only_equals_full_logits(build, tokenizer):
    """The fast loss path: same loss and same LoRA gradients as full logits."""
    model = adapted_tiny(build, tokenizer)
    batch = collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)
    grads = []
    for loss_fn in (causal_lm_loss, full_logits_loss):
        model.zero_grad()
        loss, n = loss_fn(model, batch)
        (loss / n).backward()
        grads.append(trainable_grads(model))
        grads[-1]["loss"] = loss.detach()
    torch.testing.assert_close(grads[0].pop("loss"), grads[1].pop("loss"), rtol=1e-5, atol=1e-5)
    for key in grads[1]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-6)


TINY_RUN = {"max_steps": 8, "batch_size": 4, "learning_rate": 2e-2, "eval_every": 4, "warmup_ratio": 0.0}


def _train(tokenizer, run_dir, model=None, base=TINY_RUN, loss_fn=None, **overrides):
    """``train`` on the tiny router rows (a tiny adapted Llama unless ``model``); ``overrides``: TrainerConfig keys."""
    if model is None:
        model = tiny_llama(len(tokenizer), seed=0)
        torch.manual_seed(0)
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    data = _encoded(tokenizer)
    cfg = TrainerConfig(**{**base, **overrides})
    result = train(
        model,
        data,
        data[:4],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=run_dir,
        base_model_name="tiny",
        progress=False,
        loss_fn=loss_fn,
    )
    return model, result


def test_training_lowers_the_loss_and_logs(tokenizer, tmp_path):
    model, result = _train(tokenizer, tmp_path, max_steps=20)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 20 and steps[-1]["loss"] < steps[0]["loss"] * 0.9
    assert [r["step"] for r in records if "valid_loss" in r] == [4, 8, 12, 16, 20]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert result.train_tokens_per_second > 0 and result.peak_memory_mb > 0


def test_gradient_accumulation_matches_a_big_batch(tokenizer):
    """Loss normalised by the step's token count: 2 x 3 accumulated == one batch of 6."""
    model = adapted_tiny(tiny_llama, tokenizer)
    data = _encoded(tokenizer, 6)
    big = collate(data, tokenizer.pad_token_id)
    loss, n = causal_lm_loss(model, big)
    (loss / n).backward()
    expected = trainable_grads(model)
    model.zero_grad()
    halves = [collate(data[:2], tokenizer.pad_token_id), collate(data[2:], tokenizer.pad_token_id)]
    total = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)
    for half in halves:
        loss, _ = causal_lm_loss(model, half)
        (loss / total).backward()
    for key, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-7)


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_adapter(tokenizer, tmp_path):
    straight, _ = _train(tokenizer, tmp_path / "straight")
    calls = {"n": 0}
    data = _encoded(tokenizer)
    cfg = TrainerConfig(**TINY_RUN)

    def fresh_model():
        model = tiny_llama(len(tokenizer), seed=0)
        torch.manual_seed(0)
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
        return model

    def dies_after_checkpoint(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # steps 1-4, one validation batch, step 5, then dies in step 6
            raise Killed
        return causal_lm_loss(model, batch)

    with pytest.raises(Killed):
        train(
            fresh_model(),
            data,
            data[:4],
            cfg,
            pad_id=tokenizer.pad_token_id,
            run_dir=tmp_path / "resumed",
            base_model_name="tiny",
            loss_fn=dies_after_checkpoint,
            progress=False,
        )
    from affinage.training import checkpoint

    assert checkpoint.latest(tmp_path / "resumed" / "checkpoint").name == "step-000004"
    resumed = fresh_model()
    result = train(
        resumed,
        data,
        data[:4],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path / "resumed",
        base_model_name="tiny",
        progress=False,
    )
    assert result.steps == 8
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in records if "valid_loss" in r] == [4, 8]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a, b)


def test_best_adapter_follows_the_task_metric_and_stops_early(tokenizer, tmp_path):
    """best_metric=task keeps the adapter with the highest task score; patience ends the run."""
    scores = iter([0.2, 0.9, 0.5, 0.4, 0.3, 0.1])
    model = tiny_llama(len(tokenizer), seed=0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    data = _encoded(tokenizer)
    cfg = TrainerConfig(
        **{**TINY_RUN, "max_steps": 24, "eval_every": 2, "best_metric": "task", "early_stopping_patience": 2}
    )
    saved = {}

    def task_score(m):
        score = next(scores)
        saved[score] = {k: v.detach().clone() for k, v in m.named_parameters() if "lora_" in k}
        return score

    result = train(
        model,
        data,
        data[:4],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="tiny",
        progress=False,
        task_score=task_score,
    )
    assert result.steps == 8 and result.best_step == 4 and result.best_valid_score == 0.9  # 0.9 at step 4, then 2 worse
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_score"] for r in records if "valid_score" in r] == [0.2, 0.9, 0.5, 0.4]
    assert records[-1] == {"step": 8, "early_stop": True, "best_step": 4}
    again = train(
        model,
        data,
        data[:4],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="tiny",
        progress=False,
        task_score=task_score,
    )  # killed after stopping early: resuming trains nothing more
    assert again.steps == 8 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(records)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, tensor in adapter.items():  # the step-4 factors, not the last step's
        torch.testing.assert_close(tensor, saved[0.9][key.removeprefix("base_model.model.")])


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_packed_rows_give_the_unpacked_loss_and_gradients(build, tokenizer):
    """Packing: no attention across examples, positions restart: same loss, same gradients."""
    from affinage.data.batching import collate_packed

    model = adapted_tiny(build, tokenizer)
    data = _encoded(tokenizer, 6)
    packed = collate_packed(data, tokenizer.pad_token_id, capacity=130)
    assert packed["input_ids"].shape[0] < len(data)  # several examples share a row
    results = []
    for batch in (collate(data, tokenizer.pad_token_id), packed):
        model.zero_grad()
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        results.append((loss.detach(), n, trainable_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1] == results[1][1]
    for key, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][key], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_widths_padded_to_a_multiple_give_the_same_loss_and_gradients(build, tokenizer):
    """trainer.pad_to_multiple_of: the extra padding carries no loss and no attention, in the training forms too."""
    from affinage.training.loop import training_forms

    model = adapted_tiny(build, tokenizer)
    data = _encoded(tokenizer, 6)
    longest = max(len(e.input_ids) for e in data)
    results = []
    for multiple in (1, 16):
        batch = collate(data, tokenizer.pad_token_id, multiple=multiple)
        assert batch["input_ids"].shape[1] == (longest if multiple == 1 else -(-longest // 16) * 16)
        model.zero_grad()
        with training_forms(model):
            loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
        results.append((loss.detach(), n, trainable_grads(model)))
    assert longest % 16  # the padded batch is wider
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1] == results[1][1]
    for key, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][key], grad, rtol=1e-4, atol=1e-6)


def test_training_with_and_without_packing_gives_the_same_losses(tokenizer, tmp_path):
    _, plain = _train(tokenizer, tmp_path / "plain", packing=False)
    _, packed = _train(tokenizer, tmp_path / "packed", packing=True)
    assert packed.packed and not plain.packed
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (plain, packed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_split_rows_keeps_every_token_within_the_budget(tokenizer):
    from affinage.data.batching import split_rows
    from affinage.training import resolve_forward_budget

    data = sorted(_encoded(tokenizer), key=lambda e: len(e.input_ids))
    batch = collate(data, tokenizer.pad_token_id, list(range(len(data))))
    width = batch["input_ids"].shape[1]
    groups = split_rows(batch, 3 * width)
    assert len(groups) == 4 and all(g["input_ids"].numel() <= 3 * width for g in groups)
    assert groups[0]["input_ids"].shape[1] < width  # the shortest rows shed the padding only the longest needed
    assert torch.cat([g["indices"] for g in groups]).tolist() == list(range(len(data)))
    for group in groups:
        for row, index in enumerate(group["indices"].tolist()):
            n = len(data[index].input_ids)
            assert group["input_ids"][row, :n].tolist() == data[index].input_ids
            assert group["labels"][row, :n].tolist() == data[index].labels
    padded = split_rows(batch, 3 * width, multiple=8)  # a group's width stays a multiple of 8 (or the batch's)
    assert [g["input_ids"].shape[1] for g in padded] == [
        min(width, -(-g["input_ids"].shape[1] // 8) * 8) for g in groups
    ]
    assert split_rows(batch, None) == [batch]
    one_row = {key: value[:1] for key, value in batch.items()}
    assert split_rows(one_row, 1) == [one_row]  # a row is never cut
    assert (
        resolve_forward_budget("auto", torch.device("cpu")) == 512
        and resolve_forward_budget("auto", torch.device("cuda")) is None
    )


@pytest.mark.parametrize("packing", [False, True])
def test_a_token_budget_per_forward_gives_the_same_training(tokenizer, tmp_path, packing):
    """Long micro-batches run as several forwards: the same losses step by step, the same adapter."""
    # 4 examples of 29-44 tokens per batch (packed: rows of at most 64): 100 tokens splits them.
    whole, unsplit = _train(tokenizer, tmp_path / "whole", packing=packing, max_seq_len=64, max_tokens_per_forward=None)
    split, budgeted = _train(tokenizer, tmp_path / "split", packing=packing, max_seq_len=64, max_tokens_per_forward=100)
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (unsplit, budgeted)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (key, a), b in zip(lora_modules(whole).items(), lora_modules(split).values()):
        torch.testing.assert_close(a.lora_B.weight, b.lora_B.weight, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_activation_checkpointing_gives_the_same_gradients_with_dropout(build, tokenizer):
    """Recomputed blocks replay the RNG: the same dropout masks, the same loss and gradients, with the
    training forms (whose LoRA inputs are themselves recomputed in backward) on a frozen base."""
    from affinage.lora.layers import share_dropout
    from affinage.training import activation_checkpointing
    from affinage.training.loop import training_forms

    model = adapted_tiny(build, tokenizer, dropout=0.2)
    mark_only_lora_as_trainable(model)
    share_dropout(model)
    model.train()
    batch = collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)
    results = []
    for enabled in (False, True):
        model.zero_grad()
        torch.manual_seed(3)
        with activation_checkpointing(model, enabled), training_forms(model):
            loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
        results.append((loss.detach(), trainable_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, rtol=1e-5, atol=1e-7)
    assert not model.is_activation_checkpointing  # switched off after the block


def test_auto_checkpointing_only_for_rows_the_budget_cannot_split_nor_memory_hold(tokenizer, tmp_path, monkeypatch):
    """Rows of 29-44 tokens against a 24-token budget: each forward is one row over it, recomputed when the
    machine's memory could not hold its activations (a share of 0 here), else not; the same losses."""
    from transformers import PreTrainedModel

    from affinage.training import recompute_policy

    calls = []
    original = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(
        PreTrainedModel, "activation_checkpointing_enable", lambda self, **kw: calls.append(1) or original(self, **kw)
    )
    _, plain = _train(
        tokenizer, tmp_path / "plain", max_steps=3, max_tokens_per_forward=24, gradient_checkpointing=False
    )
    assert not calls
    _train(tokenizer, tmp_path / "fits", max_steps=3, max_tokens_per_forward=24, gradient_checkpointing="auto")
    assert not calls  # a tiny model's rows take nothing of the machine's memory
    monkeypatch.setattr(recompute_policy, "ACTIVATION_SHARE", 0.0)
    _, auto = _train(
        tokenizer, tmp_path / "auto", max_steps=3, max_tokens_per_forward=24, gradient_checkpointing="auto"
    )
    assert len(calls) == 3 * 4  # every forward of 3 steps x 4 rows
    calls.clear()
    _train(tokenizer, tmp_path / "roomy", max_steps=3, max_tokens_per_forward=512, gradient_checkpointing="auto")
    assert not calls  # rows within the budget keep their activations
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (plain, auto)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_listener_stops_the_run_between_validations(tokenizer, tmp_path):
    """A caller's listener (``affinage bench quality``'s probe) ends the run after the step it says so."""
    from affinage.training import Listener

    class StopAtThree(Listener):
        def should_stop(self, state):
            return state.step >= 3

    model = tiny_llama(len(tokenizer), seed=0)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    data = _encoded(tokenizer)
    result = train(
        model,
        data,
        data[:4],
        TrainerConfig(**TINY_RUN),
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="tiny",
        progress=False,
        listeners=[StopAtThree()],
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3 and [r["step"] for r in records if "loss" in r] == [1, 2, 3]
