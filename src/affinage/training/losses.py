"""Losses over a batch and the validation loss over a data set.

Speed comes from not doing useless work: the vocabulary head runs only at positions that
carry a label (for a classifier that is 2-3 positions out of ~100). A loss function returns
the *summed* loss and the number of labelled tokens, so the loop can normalise by the tokens
of a whole optimizer step rather than per micro-batch (which would over-weight short examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from affinage import distributed
from affinage.data.batching import collate
from affinage.data.template import Encoded
from affinage.training.head_loss import head_cross_entropy

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, int]]

CPU = torch.device("cpu")  # the default device of every training function


def model_inputs(batch: dict) -> dict:
    """A padded batch goes in with its attention mask; a packed one with restarting position ids."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, head applied only there."""
    hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    selected = hidden[:, :-1][mask]  # (n_labelled, hidden): the head never sees prompt tokens
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head_cross_entropy(selected, model.get_output_embeddings(), targets[mask], cap), int(mask.sum())


def full_logits_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Reference path: full logits at every position (what HF's loss does); for equivalence tests."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum"), int(mask.sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    loss_fn: LossFn = causal_lm_loss,
    multiple: int = 1,
) -> float:
    """Mean per-token loss on ``data`` with dropout off (batch widths rounded up to ``multiple``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    for start in distributed.shard(range(0, len(order), batch_size)):  # under torchrun, each process a share
        chunk = order[start : start + batch_size]
        batch = to_device(collate([data[i] for i in chunk], pad_id, chunk, multiple), device)
        loss, n = loss_fn(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    total, count = distributed.sum_shares(total, count)
    return total / max(count, 1)
