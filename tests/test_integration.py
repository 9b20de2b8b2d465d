"""Integration tests on the real shipped models (SmolLM2-135M-Instruct, Gemma 3 270M)."""

import json
from pathlib import Path

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.formats import load_examples
from affinage.data.prompting import Prompting
from affinage.data.template import encode_example
from affinage.evaluate import score_labels
from affinage.lora import inject_lora, load_adapter
from affinage.models import EMBEDDED_MODELS, load_base_model, resolve_model_path
from affinage.training import train

pytestmark = pytest.mark.integration
EMAILS = Path(__file__).resolve().parents[1] / "examples" / "email-router" / "emails.jsonl"
LABELS = ["Commercial", "Finance", "RH", "SPAM", "Support"]


def _installed(name: str) -> bool:
    try:
        resolve_model_path(name)
        return True
    except Exception:
        return False


def _first_steps(model, tokenizer, tmp_path, steps, lr):
    examples = load_examples(EMAILS)[:16]
    data = [encode_example(tokenizer, e, 256) for e in examples]
    cfg = TrainerConfig(
        max_steps=steps, batch_size=4, learning_rate=lr, warmup_ratio=0.0, eval_every=steps, lr_scheduler="constant"
    )
    return examples, train(
        model,
        data,
        data[:4],
        cfg,
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="real",
        progress=False,
    )


@pytest.mark.skipif(not _installed("smollm2-135m-instruct"), reason=EMBEDDED_MODELS["smollm2-135m-instruct"]["install"])
def test_smollm2_trains_and_the_adapter_reloads_with_the_same_outputs(tmp_path):
    loaded = load_base_model("smollm2-135m-instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    examples, result = _first_steps(model, tokenizer, tmp_path, steps=8, lr=2e-3)
    losses = [record["loss"] for record in result.history if "loss" in record]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 * 0.5, losses
    scores = score_labels(model, tokenizer, examples[:3], LABELS, Prompting())
    fresh = load_base_model("smollm2-135m-instruct").model
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(
        score_labels(fresh, tokenizer, examples[:3], LABELS, Prompting()), scores, rtol=1e-4, atol=1e-4
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "q_proj" in config["target_modules"]


@pytest.mark.skipif(not _installed("gemma3-270m"), reason=EMBEDDED_MODELS["gemma3-270m"]["install"])
def test_gemma3_trains_through_the_same_code_path(tmp_path):
    loaded = load_base_model("gemma3-270m")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert "gemma3" in model.config.model_type
    torch.manual_seed(0)
    names = inject_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    assert len(names) == 7 * model.config.num_hidden_layers
    _, result = _first_steps(model, tokenizer, tmp_path, steps=4, lr=1e-3)
    losses = [record["loss"] for record in result.history if "loss" in record]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0], losses
