"""Evaluate a model on a split: label scoring or generation, and classification metrics.

Label scoring restricts the answer to the label set: each label's log-probability (its tokens
and EOS) given the prompt. The prompt is run once and its KV cache shared by every label, so
scoring 5 labels costs little more than one forward pass over the prompt.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from affinage import distributed
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.data.template import encode_completion
from affinage.errors import ConfigError

if TYPE_CHECKING:
    from affinage.evaluate.constrain import Constraint


def _cache_argument(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids that ignore the padding."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def score_labels(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    prompting: Prompting,
    batch_size: int = 8,
) -> torch.Tensor:
    """Log-probability of each label for each example: a (len(examples), len(labels)) tensor.

    Prompts run in left-padded batches; their KV cache is then repeated once per label and
    only the label tokens are run on top of it.
    """
    device = next(model.parameters()).device
    label_ids = [encode_completion(tokenizer, label) for label in labels]
    n_labels, width = len(labels), max(len(ids) for ids in label_ids)
    pad = tokenizer.pad_token_id
    label_tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in label_ids], device=device)
    label_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in label_ids], device=device)
    model.eval()
    prompts = [prompting.prompt_ids(tokenizer, e, reserve=width) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    scores = torch.empty(len(examples), n_labels)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, positions = (t.to(device) for t in left_pad([prompts[i] for i in chunk], pad))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        total = F.log_softmax(out.logits[:, -1].float(), dim=-1)[:, label_tokens[:, 0]]  # (batch, labels)
        if width > 1:
            cache = _output_cache(out)
            cache.batch_repeat_interleave(n_labels)  # row b*n_labels + k: prompt b followed by label k
            attention = torch.cat([mask.repeat_interleave(n_labels, dim=0), label_mask.repeat(len(chunk), 1)], dim=1)
            label_positions = mask.sum(dim=1).repeat_interleave(n_labels)[:, None] + torch.arange(width, device=device)
            rest = (
                model(
                    input_ids=label_tokens.repeat(len(chunk), 1),
                    attention_mask=attention,
                    position_ids=label_positions,
                    **{_cache_argument(model): cache},
                )
                .logits[:, :-1]
                .float()
            )
            logp = F.log_softmax(rest, dim=-1).gather(-1, label_tokens[:, 1:].repeat(len(chunk), 1)[..., None])[..., 0]
            total += (logp * label_mask[:, 1:].repeat(len(chunk), 1)).sum(dim=1).view(len(chunk), n_labels)
        scores[chunk] = total.cpu()
    return scores


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    constraint: Constraint | None = None,
) -> list[str]:
    """Answers for each example, batched with left padding, greedy unless temperature > 0.

    Decoding is bound by reading the weights, not by arithmetic: on the 2-core dev CPU a step
    costs 198 ms at batch 8 and 422 ms at batch 32 (1.9x the tokens/s), hence batches of 32.
    With a ``constraint`` every answer matches it (:mod:`affinage.evaluate.constrain`), returned
    exactly as generated: stripping spaces could break the match.
    """
    device = next(model.parameters()).device
    model.eval()
    compiled = _compile(constraint, tokenizer, max_new_tokens)
    outputs: list[str] = [""] * len(examples)
    encoded = [prompting.prompt_ids(tokenizer, e, reserve=max_new_tokens) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, _ = left_pad([encoded[i] for i in chunk], tokenizer.pad_token_id)
        width = ids.shape[1]
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=_constrained(compiled, width, max_new_tokens),
            **sampling,
        )
        for row, index in enumerate(chunk):
            if compiled is not None:
                text = tokenizer.decode(
                    generated[row, width:], skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                outputs[index] = text
                continue
            # A generation cut by max_new_tokens can end inside a multi-byte character (an emoji
            # is 3-4 byte tokens): drop that partial character rather than print U+FFFD.
            outputs[index] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).rstrip("\ufffd").strip()
    return outputs


def _compile(constraint: Constraint | None, tokenizer: Any, max_new_tokens: int) -> Any:
    """The constraint compiled for this tokenizer; an error when no match fits in ``max_new_tokens``."""
    if constraint is None:
        return None
    from affinage.evaluate.constrain import compile_constraint  # imports transformers: only when constrained

    compiled = compile_constraint(constraint, tokenizer)
    if compiled.min_tokens() > max_new_tokens:
        raise ConfigError(
            f"the {constraint.kind} constraint needs at least {compiled.min_tokens()} new tokens, "
            f"more than max_new_tokens ({max_new_tokens})",
            where=f"generation.constraint.{constraint.kind}",
            fix=f"raise max_new_tokens to {compiled.min_tokens()} or more",
        )
    return compiled


def _constrained(compiled: Any, width: int, max_new_tokens: int) -> Any:
    """A fresh logits processor list for one batch (each holds its rows' automaton states), or None."""
    if compiled is None:
        return None
    from transformers import LogitsProcessorList

    from affinage.evaluate.constrain import ConstrainedLogits

    return LogitsProcessorList([ConstrainedLogits(compiled, width, max_new_tokens)])


def _shared_scores(
    model: Any, tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], prompting: Prompting
) -> torch.Tensor:
    """:func:`score_labels`, the examples split across the processes of a torchrun run (all get every row)."""
    rows = distributed.map_shards(lambda part: list(score_labels(model, tokenizer, part, labels, prompting)), examples)
    return torch.stack(rows) if rows else torch.empty(0, len(labels))


def _shared_generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    max_new_tokens: int,
    constraint: Constraint | None = None,
) -> list[str]:
    """:func:`generate`, the examples split across the processes of a torchrun run (all get every answer)."""
    return distributed.map_shards(
        lambda part: generate(model, tokenizer, part, prompting, max_new_tokens=max_new_tokens, constraint=constraint),
        examples,
    )


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: gold)."""
    columns = list(labels) + sorted({p for p in predicted if p not in labels})
    matrix = [[0] * len(columns) for _ in labels]
    for g, p in zip(gold, predicted):
        if g in labels:
            matrix[labels.index(g)][columns.index(p)] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted_as = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": actual,
        }
    correct = sum(g == p for g, p in zip(gold, predicted))
    return {
        "accuracy": round(correct / max(len(gold), 1), 4),
        "macro_f1": round(sum(c["f1"] for c in per_class.values()) / max(len(per_class), 1), 4),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "columns": columns, "matrix": matrix},
        "n": len(gold),
    }


UNSURE = "unsure"


def evaluate_classification(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    prompting: Prompting,
    method: str = "score",
    max_new_tokens: int = 16,
    abstain_threshold: float | None = None,
    constraint: Constraint | None = None,
) -> dict[str, Any]:
    """Predict a label for each example and compute the metrics; says which method was used.

    With ``abstain_threshold`` (label scoring only) an example whose top label probability is
    below it is answered ``unsure``: it counts as an error in accuracy, and ``coverage`` and
    ``answered_accuracy`` say how often the model answered and how well when it did.
    """
    if abstain_threshold is not None and UNSURE in labels:
        raise ConfigError(
            f"a label is named '{UNSURE}', the abstain answer",
            where="eval.abstain_threshold",
            fix="rename that label or drop the threshold",
        )
    started = time.perf_counter()
    gold = [e.completion.strip() for e in examples]
    loss_from_scores: dict[str, float] = {}
    if method == "score":
        scores = _shared_scores(model, tokenizer, examples, labels, prompting)
        probabilities = scores.softmax(dim=-1)
        top, best = probabilities.max(dim=-1)
        predicted = [
            labels[i] if abstain_threshold is None or p >= abstain_threshold else UNSURE
            for i, p in zip(best.tolist(), top.tolist())
        ]
        details = [
            {"probabilities": {label: round(float(p), 4) for label, p in zip(labels, row)}} for row in probabilities
        ]
        # The gold label's score is its teacher-forced log-likelihood (tokens + EOS): the
        # completion loss comes for free, no second pass over the examples.
        known = [(row, list(labels).index(g)) for row, g in enumerate(gold) if g in labels]
        if known:
            lengths = [len(encode_completion(tokenizer, label)) for label in labels]
            nll = -sum(float(scores[row, k]) for row, k in known) / sum(lengths[k] for _, k in known)
            loss_from_scores = {"loss": round(nll, 4), "perplexity": round(math.exp(min(nll, 50.0)), 3)}
    else:
        outputs = _shared_generate(model, tokenizer, examples, prompting, max_new_tokens, constraint)
        predicted = [match_label(text, labels) for text in outputs]
        details = [{"generated": text} for text in outputs]
    seconds = time.perf_counter() - started
    metrics = classification_metrics(gold, predicted, labels)
    metrics.update(loss_from_scores)
    if abstain_threshold is not None:
        answered = [(g, p) for g, p in zip(gold, predicted) if p != UNSURE]
        metrics["coverage"] = round(len(answered) / max(len(gold), 1), 4)
        metrics["answered_accuracy"] = round(sum(g == p for g, p in answered) / max(len(answered), 1), 4)
    metrics.update(
        task="classification",
        method="label scoring (answer restricted to the label set)"
        if method == "score"
        else _method(constraint, "free generation"),
        examples_per_second=round(len(examples) / max(seconds, 1e-9), 2),
        predictions=[{"gold": g, "predicted": p, **d} for g, p, d in zip(gold, predicted, details)],
    )
    return metrics


def match_label(text: str, labels: Sequence[str]) -> str:
    """A generated answer counts as a label when it is that label (case and spacing aside)."""
    first = text.strip().split("\n")[0].strip().strip(".").strip()
    for label in labels:
        if first.lower() == label.lower():
            return label
    for label in labels:
        if first.lower().startswith(label.lower()):
            return label
    return first or "(empty)"


def _length_stats(outputs: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    out_words = [len(o.split()) for o in outputs]
    gold_words = [len(g.split()) for g in gold]
    mean_out, mean_gold = sum(out_words) / max(len(out_words), 1), sum(gold_words) / max(len(gold_words), 1)
    return {
        "mean_output_words": round(mean_out, 2),
        "mean_reference_words": round(mean_gold, 2),
        "length_ratio": round(mean_out / mean_gold, 3) if mean_gold else 0.0,
    }


def generation_metrics(outputs: Sequence[str], gold: Sequence[str]) -> dict[str, Any]:
    """Exact match, corpus chrF (sacrebleu, 0-100) and length statistics."""
    from sacrebleu.metrics import CHRF

    exact = sum(o.strip() == g.strip() for o, g in zip(outputs, gold))
    chrf = CHRF().corpus_score(list(outputs), [list(gold)]).score if outputs else 0.0
    return {"exact_match": round(exact / max(len(gold), 1), 4), "chrf": round(chrf, 2), **_length_stats(outputs, gold)}


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    max_new_tokens: int = 64,
    constraint: Constraint | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    outputs = _shared_generate(model, tokenizer, examples, prompting, max_new_tokens, constraint)
    seconds = time.perf_counter() - started
    gold = [e.completion.strip() for e in examples]
    return {
        "task": "generation",
        "method": _method(constraint),
        **generation_metrics(outputs, gold),
        "examples_per_second": round(len(examples) / max(seconds, 1e-9), 2),
        "n": len(gold),
        "predictions": [{"gold": g, "output": o} for g, o in zip(gold, outputs)],
    }


def evaluate_pattern(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    checker: Callable[[str], float],
    name: str,
    max_new_tokens: int = 64,
    constraint: Constraint | None = None,
) -> dict[str, Any]:
    """Generate an answer per example and score each with a pattern checker (mean score in [0, 1])."""
    started = time.perf_counter()
    outputs = _shared_generate(model, tokenizer, examples, prompting, max_new_tokens, constraint)
    seconds = time.perf_counter() - started
    scores = [checker(o) for o in outputs]
    gold = [e.completion.strip() for e in examples]
    return {
        "task": "pattern",
        "method": f"{_method(constraint)}, checked by '{name}'",
        "pattern": name,
        "pattern_score": round(sum(scores) / max(len(scores), 1), 4),
        **_length_stats(outputs, gold),
        "examples_per_second": round(len(examples) / max(seconds, 1e-9), 2),
        "n": len(outputs),
        "predictions": [{"gold": g, "output": o, "score": s} for g, o, s in zip(gold, outputs, scores)],
    }


def _method(constraint: Constraint | None, free: str = "free generation (greedy)") -> str:
    """How the answers were generated, for the metrics' ``method``."""
    return free if constraint is None else f"generation constrained by a {constraint.kind}"
