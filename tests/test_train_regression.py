"""Pinned losses (torchtune's recipe tests): a refactor of the training code must not move a single step.

The stored values were produced by the training loop as it was before it was split into the
``affinage.training`` package. Regenerate them only for a deliberate change of the maths:
``python -m tests.test_train_regression`` prints the literals.
"""

from __future__ import annotations

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.lora import inject_lora
from affinage.training import causal_lm_loss, train
from tests.conftest import EMAILS, _tokenizer, tiny_llama

RUN = {
    "max_steps": 8,
    "batch_size": 4,
    "learning_rate": 2e-2,
    "eval_every": 4,
    "warmup_ratio": 0.1,
    "seed": 7,
    "max_tokens_per_forward": None,
    "pad_to_multiple_of": 1,  # the widths of the code the values were pinned with ("padded" below: the default)
}
CASES = {
    "plain": ({"packing": False}, None),
    "packed": ({"packing": True, "max_seq_len": 96}, None),
    "prefix_cache": ({"packing": False, "cache_frozen_blocks": True}, 2),  # LoRA on blocks 2-3 of 4: 0-1 cached
    # Widths rounded up to 8 (trainer.pad_to_multiple_of's default): the padding carries no loss, but dropout's
    # masks are drawn over the padded shape, so from step 2 the values differ from "plain"'s.
    "padded": ({"packing": False, "pad_to_multiple_of": 8}, None),
}

# Per optimizer step: the mean training loss per labelled token; per validation: the validation loss.
PINNED = {
    "plain": {
        "train": [
            5.962950570242746,
            5.778561518742488,
            5.586968315972222,
            5.260398864746094,
            5.295493492713342,
            5.252367231580946,
            5.039334433419364,
            5.137031555175781,
        ],
        "valid": [5.510164260864258, 5.39992094039917],
    },
    "packed": {
        "train": [
            5.962950570242746,
            5.773468017578125,
            5.586941189236111,
            5.270586831229074,
            5.2474494347205525,
            5.311432732476129,
            5.080395834786551,
            5.137694138746995,
        ],
        "valid": [5.693808555603027, 5.452691555023193],
    },
    "prefix_cache": {
        "train": [
            5.930367061070034,
            5.738873408390925,
            5.683678521050347,
            5.520052773611886,
            5.50828376183143,
            5.503413306342231,
            6.010347093854632,
            5.991689241849459,
        ],
        "valid": [5.6360931396484375, 6.211398124694824],
    },
    "padded": {
        "train": [
            5.962950025285993,
            5.7883735069861775,
            5.581018235948351,
            5.226132529122489,
            5.205318157489483,
            5.569299485948351,
            5.054811750139509,
            5.138263408954327,
        ],
        "valid": [5.457399845123291, 5.40341329574585],
    },
}


def _run(tokenizer, case: str, run_dir) -> dict[str, list[float]]:
    """Train one case and return its unrounded per-step training losses and validation losses."""
    overrides, layers = CASES[case]
    model = tiny_llama(len(tokenizer), seed=0, layers=4 if layers else 2)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, layers=layers)
    examples = [Example(prompt=text, completion=label) for label, texts in EMAILS.items() for text in texts]
    data = [encode_example(tokenizer, e, 128) for e in examples]
    losses: dict[str, list[float]] = {"train": [], "valid": []}

    def recording_loss(model, batch):
        loss, n = causal_lm_loss(model, batch)
        # One micro-batch per step (no accumulation, no token budget): a step's loss is this call's.
        losses["train" if torch.is_grad_enabled() else "valid"].append(float(loss.detach()) / n)
        return loss, n

    result = train(
        model,
        data[:10],
        data[10:],
        TrainerConfig(**{**RUN, **overrides}),
        pad_id=tokenizer.pad_token_id,
        run_dir=run_dir,
        base_model_name="tiny",
        loss_fn=recording_loss,
        progress=False,
    )
    assert result.packed == (case == "packed") and result.frozen_prefix_cached == (case == "prefix_cache")
    assert [r["loss"] for r in result.history if "loss" in r] == [round(x, 5) for x in losses["train"]]
    return losses


@pytest.mark.parametrize("case", list(CASES))
def test_training_losses_equal_the_pinned_values(tokenizer, tmp_path, case):
    losses = _run(tokenizer, case, tmp_path)
    assert losses["train"] == pytest.approx(PINNED[case]["train"], rel=1e-5)
    assert losses["valid"] == pytest.approx(PINNED[case]["valid"], rel=1e-5)


if __name__ == "__main__":  # print the literals for PINNED
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            print(f'    "{name}": {_run(_tokenizer(), name, Path(tmp) / name)!r},')
