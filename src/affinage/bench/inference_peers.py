"""The inference benchmark's plain-transformers sides: what a peer writes with HF APIs alone.

Each gets the same token ids as affinage (the prompts rendered once by affinage's template, each
label's tokens followed by EOS, as :func:`affinage.evaluate.score_labels` scores them) and a
model loaded with ``AutoModelForCausalLM.from_pretrained`` in the same dtype, none of affinage's
hooks on it. Nothing here imports affinage: this is the code a peer would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

SCORING_PEERS = ("transformers-per-label", "transformers-all-labels")

DESCRIPTIONS = {
    "transformers-per-label": (
        "plain forward, one per (example, label) pair: for each label, batches of {batch} examples of "
        "prompt+label, left-padded, position ids from the mask, logits_to_keep = label width + 1, "
        "label log-probs summed; the prompt runs once per label ({labels}x)"
    ),
    "transformers-all-labels": (
        "plain forward, all labels of {batch} examples in one batch of {batch}x{labels} rows of prompt+label, "
        "left-padded, position ids from the mask, logits_to_keep = label width + 1; the prompt still runs "
        "once per label ({labels}x)"
    ),
    "transformers-generate": (
        "model.generate, batches of {batch} rows in file order, left-padded (tokenizer.pad), attention "
        "mask, use_cache=True, do_sample=False, max_new_tokens={new}, the model's default cache"
    ),
}


def load_plain(path: str, dtype: torch.dtype, device: torch.device) -> Any:
    """The model as a peer loads it: from_pretrained in the bench's dtype, eval mode, nothing patched."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _left_pad(sequences: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left padding with plain torch: ids, attention mask, and position ids counted from each row's first token."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _pair_scores(
    model: Any, prompts: Sequence[list[int]], labels: Sequence[list[int]], pairs: list[tuple[int, int]], pad_id: int
) -> list[float]:
    """Log-likelihood of label j after prompt i for each (i, j), one forward over their prompt+label rows.

    Left padding puts every label at the rows' end, so the last ``width + 1`` positions hold all
    the logits that predict label tokens: the head runs there only (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    width = max(len(labels[j]) for _, j in pairs)
    ids, mask, positions = _left_pad([prompts[i] + labels[j] for i, j in pairs], pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, (_, j) in enumerate(pairs):
        label = torch.tensor(labels[j], device=device)
        kept = torch.arange(width - len(label), width, device=device)  # logit at kept index t predicts token t+1
        scores.append(float(logp[row, kept, label].sum()))
    return scores


def peer_scores(
    side: str,
    model: Any,
    prompts: Sequence[list[int]],
    labels: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """A (len(prompts), len(labels)) tensor of label log-likelihoods, computed as ``side`` does."""
    scores = torch.empty(len(prompts), len(labels))
    groups: list[list[tuple[int, int]]] = []
    starts = range(0, len(prompts), batch_size)
    if side == "transformers-per-label":
        groups = [
            [(i, j) for i in range(s, min(s + batch_size, len(prompts)))] for j in range(len(labels)) for s in starts
        ]
    elif side == "transformers-all-labels":
        groups = [
            [(i, j) for i in range(s, min(s + batch_size, len(prompts))) for j in range(len(labels))] for s in starts
        ]
    else:
        raise ValueError(f"unknown scoring side {side}")
    for pairs in groups:
        for (i, j), value in zip(pairs, _pair_scores(model, prompts, labels, pairs, pad_id)):
            scores[i, j] = value
    return scores


@torch.no_grad()
def peer_generate(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Greedy answers' token ids (through the first EOS), batches of ``batch_size`` in the rows' order."""
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [{"input_ids": p} for p in prompts[start : start + batch_size]]
        batch = tokenizer.pad(chunk, padding_side="left", return_tensors="pt").to(device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            answers.append(row[:end])
    return answers


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """An answer's text the way affinage's ``generate`` returns it (special tokens, a cut character, spaces off)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd").strip()
