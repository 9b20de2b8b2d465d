"""The task a run learns, decided once from config and data, and how it is measured.

A label task (classification) is scored by label log-probability or generation matched to the
label set; free generation by chrF; a pattern task by its checker. Every evaluation also
reports the loss and perplexity on the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from affinage.config import Config
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.data.template import Encoded, encode_example
from affinage.errors import ConfigError
from affinage.evaluate import evaluate_classification, evaluate_generation, evaluate_pattern
from affinage.evaluate.constrain import Constraint
from affinage.evaluate.patterns import resolve_checker
from affinage.training import evaluate_loss

MAX_LABELS = 20  # more distinct completions than this is a generation task, not a label task


def detect_task(config: Config, train_examples: Sequence[Example]) -> dict[str, Any]:
    """``{"task": classification|generation|pattern, "labels": [...] | None}`` from the config, else the data."""
    labels = config.eval.labels or sorted({e.completion.strip() for e in train_examples})
    output_type = config.output_features[0].type if config.output_features else None
    if config.eval.task == "pattern" or (config.eval.task == "auto" and config.eval.pattern):
        if not config.eval.pattern:
            raise ConfigError(
                "eval.task is 'pattern' but eval.pattern names no checker",
                where="eval",
                fix="set eval.pattern: hearts (or module.function)",
            )
        return {"task": "pattern", "labels": None, "pattern": config.eval.pattern}
    if config.eval.task in ("classification", "generation"):
        kind = config.eval.task
    elif output_type == "category":
        kind = "classification"
    else:
        kind = "classification" if len(labels) <= MAX_LABELS and len(labels) < len(train_examples) / 2 else "generation"
    return {"task": kind, "labels": labels if kind == "classification" else None}


def encode_all(tokenizer: Any, examples: Sequence[Example], config: Config) -> list[Encoded]:
    """Training tokens of every example (prompt masked, completion + EOS), as the run encodes them."""
    template, system, max_len = config.prompt.template, config.prompt.system, config.trainer.max_seq_len
    return [encode_example(tokenizer, e, max_len, template, system) for e in examples]


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task: dict[str, Any],
    config: Config,
    prompting: Prompting,
    *,
    with_loss: bool = True,
) -> dict[str, Any]:
    """The task metric (accuracy, chrF or pattern score) and, always, the loss and perplexity."""
    if config.eval.max_examples:
        examples = list(examples)[: config.eval.max_examples]
    metrics = _task_metrics(model, tokenizer, examples, task, config, prompting)
    if with_loss and examples and "loss" not in metrics:  # label scoring already measured it
        device = next(model.parameters()).device
        encoded = encode_all(tokenizer, examples, config)
        loss = evaluate_loss(model, encoded, config.trainer.batch_size, tokenizer.pad_token_id, device)
        metrics["loss"] = round(loss, 4)
        metrics["perplexity"] = round(math.exp(min(loss, 50.0)), 3)
    return metrics


def _task_metrics(
    model: Any, tokenizer: Any, examples: Sequence[Example], task: dict[str, Any], config: Config, prompting: Prompting
) -> dict[str, Any]:
    evaluation = config.eval
    constraint = Constraint.from_config(config.generation.constraint)
    if task["task"] == "classification":
        return evaluate_classification(
            model,
            tokenizer,
            examples,
            task["labels"],
            prompting,
            method=evaluation.method,
            abstain_threshold=evaluation.abstain_threshold,
            constraint=constraint,
        )
    if task["task"] == "pattern":
        name = task.get("pattern") or evaluation.pattern
        checker = resolve_checker(name, config.base_dir)
        return evaluate_pattern(
            model,
            tokenizer,
            examples,
            prompting,
            checker,
            name,
            max_new_tokens=evaluation.max_new_tokens,
            constraint=constraint,
        )
    return evaluate_generation(
        model, tokenizer, examples, prompting, max_new_tokens=evaluation.max_new_tokens, constraint=constraint
    )
