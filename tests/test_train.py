import json

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.batching import collate
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.lora import inject_lora, lora_modules
from affinage.train import causal_lm_loss, full_logits_loss, get_lr, train
from tests.conftest import EMAILS, tiny_gemma3, tiny_llama


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
    model = build(len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    batch = collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)
    grads = []
    for loss_fn in (causal_lm_loss, full_logits_loss):
        model.zero_grad()
        loss, n = loss_fn(model, batch)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    torch.testing.assert_close(grads[0].pop("loss"), grads[1].pop("loss"), rtol=1e-5, atol=1e-5)
    for key in grads[1]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-6)


TINY_RUN = {"max_steps": 8, "batch_size": 4, "learning_rate": 2e-2, "eval_every": 4, "warmup_ratio": 0.0}


def _train(tokenizer, tmp_path, **overrides):
    model = tiny_llama(len(tokenizer), seed=0)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    data = _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, **overrides})
    result = train(model, data, data[:4], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path, base_model_name="tiny", progress=False)
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
    model = tiny_llama(len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    data = _encoded(tokenizer, 6)
    big = collate(data, tokenizer.pad_token_id)
    loss, n = causal_lm_loss(model, big)
    (loss / n).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
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
        train(fresh_model(), data, data[:4], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path / "resumed",
              base_model_name="tiny", loss_fn=dies_after_checkpoint, progress=False)
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 4
    resumed = fresh_model()
    result = train(resumed, data, data[:4], cfg, pad_id=tokenizer.pad_token_id, run_dir=tmp_path / "resumed",
                   base_model_name="tiny", progress=False)
    assert result.steps == 8
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in records if "valid_loss" in r] == [4, 8]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a, b)
