"""The whole job, config to measured result: data -> base eval -> LoRA -> train -> eval -> save.

This is the recipe layer; the library pieces it calls (data, lora, train, evaluate) know
nothing of each other.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from affinage.config import Config
from affinage.data import DataSplits, load_splits, preview
from affinage.data.check import run_checks
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.errors import ConfigError, DataError
from affinage.evaluate import Prompting, evaluate_classification, evaluate_generation, evaluate_pattern
from affinage.lora.inject import inject_lora
from affinage.lora.layers import share_dropout
from affinage.lora.peft_format import load_adapter
from affinage.models import load_base_model, resolve_dtype
from affinage.patterns import resolve_checker
from affinage.report import comparison_table, headline, task_metric
from affinage.run import prompting_for, save_run_config, save_split, write_json
from affinage.train import evaluate_loss, train

MAX_LABELS = 20  # more distinct completions than this is a generation task, not a label task


def set_threads() -> None:
    """Use every core (PyTorch's default can leave one idle inside containers), or AFFINAGE_THREADS.

    Two torch processes sharing the cores must split them (e.g. AFFINAGE_THREADS=1 each on 2
    cores): oversubscribed OpenMP threads spin against each other and run many times slower.
    """
    wanted = os.environ.get("AFFINAGE_THREADS")
    torch.set_num_threads(int(wanted) if wanted else max(1, len(os.sched_getaffinity(0))))


def detect_task(config: Config, train_examples: Sequence[Example]) -> dict[str, Any]:
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
    evaluation = config.eval
    if task["task"] == "classification":
        metrics = evaluate_classification(
            model,
            tokenizer,
            examples,
            task["labels"],
            prompting,
            method=evaluation.method,
            abstain_threshold=evaluation.abstain_threshold,
        )
    elif task["task"] == "pattern":
        name = task.get("pattern") or evaluation.pattern
        metrics = evaluate_pattern(
            model,
            tokenizer,
            examples,
            prompting,
            resolve_checker(name, config.base_dir),
            name,
            max_new_tokens=evaluation.max_new_tokens,
        )
    else:
        metrics = evaluate_generation(model, tokenizer, examples, prompting, max_new_tokens=evaluation.max_new_tokens)
    if with_loss and examples and "loss" not in metrics:  # label scoring already measured it
        device = next(model.parameters()).device
        encoded, _ = _encode_all(tokenizer, examples, config)
        loss = evaluate_loss(model, encoded, config.trainer.batch_size, tokenizer.pad_token_id, device)
        metrics["loss"] = round(loss, 4)
        metrics["perplexity"] = round(math.exp(min(loss, 50.0)), 3)
    return metrics


def _encode_all(tokenizer: Any, examples: Sequence[Example], config: Config) -> tuple[list, int]:
    encoded = [
        encode_example(tokenizer, e, config.trainer.max_seq_len, config.prompt.template, config.prompt.system)
        for e in examples
    ]
    return encoded, sum(e.truncated for e in encoded)


def run_training(
    config: Config, output_dir: str | Path, *, compare_base: bool = True, progress: bool = True, log=print
) -> dict[str, Any]:
    """Fine-tune as ``config`` says, evaluate before and after on the test split, write the run."""
    set_threads()
    started = time.perf_counter()
    run_dir = Path(output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.trainer.precision, device)
    splits: DataSplits = load_splits(config)
    for note in splits.notes:
        log(note)
    task = detect_task(config, splits.train)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else None
    save_run_config(run_dir, config)
    if previous != (run_dir / "config.yaml").read_text(encoding="utf-8"):
        # Resume only the very same run; a new config starts clean: no stale adapter or results.
        for stale in ("checkpoint", "adapter"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        for stale in ("eval.json", "summary.json", "report.html", "report.md", "report-curves.png"):
            (run_dir / stale).unlink(missing_ok=True)
    elif (run_dir / "checkpoint").is_dir():
        log(f"resuming the interrupted run in {run_dir}")
    write_json(run_dir / "task.json", task)
    for name in ("train", "valid", "test"):
        save_split(run_dir, name, getattr(splits, name))

    log(f"loading {config.base_model} ({dtype}, {device})")
    loaded = load_base_model(
        config.base_model,
        dtype=dtype,
        device=device,
        quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    prompting = prompting_for(config)
    named = splits.non_empty()
    encoded = {name: _encode_all(tokenizer, examples, config)[0] for name, examples in named.items()}
    checks = run_checks(tokenizer, named, task["labels"], prompting, config.trainer.max_seq_len, encoded)
    for warning in checks.warnings:
        log(f"data warning: {warning}")
    if not checks.ok:
        raise DataError(
            "the data check failed:\n  " + "\n  ".join(checks.errors),
            where=str(config.base_dir),
            fix="fix the data (see `affinage data check CONFIG`)",
        )
    train_encoded, valid_encoded = encoded["train"], encoded.get("valid", [])
    truncated, valid_truncated = sum(e.truncated for e in train_encoded), sum(e.truncated for e in valid_encoded)
    n_tokens = sum(len(e.input_ids) for e in train_encoded)
    log(
        f"data: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test; "
        f"{n_tokens} train tokens; {truncated + valid_truncated} examples truncated to {config.trainer.max_seq_len} tokens; task {task['task']}"
        + (f" ({', '.join(task['labels'])})" if task["labels"] else "")
    )
    log("example as the model sees it:\n" + preview(tokenizer, splits.train[0], config))

    base_metrics = None
    if compare_base and splits.test:
        log("evaluating the base model on the test split...")
        base_metrics = evaluate_examples(model, tokenizer, splits.test, task, config, prompting)
        log(f"base model: {headline(base_metrics)} ({base_metrics['examples_per_second']} examples/s)")

    adapter = config.adapter
    torch.manual_seed(config.trainer.seed)
    targets = inject_lora(
        model,
        adapter.target_modules,
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        layers=adapter.layers_to_transform,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        init=adapter.init,
        rank_pattern=adapter.rank_pattern,
        alpha_pattern=adapter.alpha_pattern,
    )
    if adapter.shared_dropout_mask:
        share_dropout(model)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    variant = "".join(
        f" {name}"
        for name, on in (
            ("rsLoRA", adapter.use_rslora),
            ("DoRA", adapter.use_dora),
            (f"init={adapter.init}", adapter.init != "default"),
        )
        if on
    )
    log(
        f"LoRA{variant} r={adapter.r} alpha={adapter.alpha} on {len(targets)} layers: {trainable:,} trainable parameters"
    )
    task_score = None
    if config.trainer.best_metric == "task" and splits.valid:

        def task_score(m: Any) -> float:  # the task metric on the validation split picks the best adapter
            return task_metric(evaluate_examples(m, tokenizer, splits.valid, task, config, prompting, with_loss=False))

    result = train(
        model,
        train_encoded,
        valid_encoded,
        config.trainer,
        pad_id=tokenizer.pad_token_id,
        run_dir=run_dir,
        base_model_name=config.base_model,
        adapter_dropout=adapter.dropout,
        device=device,
        progress=progress,
        task_score=task_score,
    )
    load_adapter(model, run_dir / "adapter")  # the best validation checkpoint, not the last step

    tuned_metrics = None
    if splits.test:
        log("evaluating the fine-tuned model on the test split...")
        tuned_metrics = evaluate_examples(model, tokenizer, splits.test, task, config, prompting)
        write_json(run_dir / "eval.json", {"base": base_metrics, "fine_tuned": tuned_metrics})
    summary = {
        "base_model": config.base_model,
        "task": task["task"],
        "steps": result.steps,
        "train_examples": len(splits.train),
        "train_tokens": result.train_tokens,
        "truncated_examples": truncated,
        "train_seconds": result.train_seconds,
        "train_tokens_per_second": result.train_tokens_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "final_train_loss": result.final_train_loss,
        "best_valid_loss": result.best_valid_loss,
        "best_step": result.best_step,
        "best_valid_score": result.best_valid_score,
        "packed": result.packed,
        "frozen_prefix_cached": result.frozen_prefix_cached,
        "precision": str(dtype).replace("torch.", ""),
        "device": str(device),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    for name, metrics in (("base", base_metrics), ("fine_tuned", tuned_metrics)):
        if metrics:
            summary[f"{name}_test"] = {
                k: v for k, v in metrics.items() if k not in ("predictions", "per_class", "confusion_matrix")
            }
    write_json(run_dir / "summary.json", summary)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # complete: nothing left to resume
    if tuned_metrics:
        log("\n" + comparison_table(base_metrics, tuned_metrics))
    log(
        f"\ntrained {result.steps} steps in {result.train_seconds:.0f}s ({result.train_tokens_per_second:.0f} tokens/s, peak {result.peak_memory_mb:.0f} MB); run written to {run_dir}"
    )
    return summary
