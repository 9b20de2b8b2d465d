"""The recipe, config to measured result: data -> base eval -> LoRA -> train -> eval -> summary.

This is the layer that wires the library pieces (data, models, lora, train, task) and the run
directory together; the pieces below know nothing of each other or of the directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from affinage import distributed
from affinage.config import Config
from affinage.data import DataSplits, load_eval_sets, load_splits, preview
from affinage.data.check import CheckReport, run_checks
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.data.template import Encoded
from affinage.errors import ConfigError, DataError
from affinage.evaluate.task import detect_task, encode_all, evaluate_examples
from affinage.lora.inject import inject_lora
from affinage.lora.layers import share_dropout
from affinage.lora.peft_format import load_adapter, save_adapter
from affinage.lora.shared_input import share_inputs
from affinage.models import (
    check_model,
    embedded_name,
    load_base_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from affinage.report import comparison_table, headline, task_metric
from affinage.run_dir import RunDir
from affinage.runtime import pick_device
from affinage.training import Listener, TrainResult, fine_tune, peak_memory_mb
from affinage.training.estimate import Lengths, MemoryEstimate, estimate_memory, resident_mb, skeleton
from affinage.training.sharding import is_sharded

Log = Callable[[str], None]


@dataclass
class Prepared:
    """What the recipe knows once the data is read, checked and encoded and the model loaded."""

    config: Config
    splits: DataSplits
    task: dict[str, Any]
    model: Any
    tokenizer: Any
    prompting: Prompting
    encoded: dict[str, list[Encoded]]
    device: torch.device
    dtype: torch.dtype


def check_data(config: Config, tokenizer: Any = None) -> CheckReport:
    """`affinage data check`: every check on the data a config describes (the tokenizer only, not the model)."""
    splits = load_splits(config)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_model_path(config.base_model), config.trust_remote_code)
    task = detect_task(config, splits.train)
    prompting = Prompting.from_config(config)
    return run_checks(
        tokenizer,
        splits.non_empty(),
        task["labels"],
        prompting,
        config.trainer.max_seq_len,
        near_duplicate_threshold=config.data.split.near_duplicate_threshold,
        eval_sets=load_eval_sets(config),
    )


def estimate_training(config: Config, device: torch.device | None = None) -> MemoryEstimate:
    """`affinage train --estimate`: the predicted peak memory, from the config, tokenizer and data only.

    No weight is read (a GGUF model must already be converted: that is cached once per file). This
    process has imported and read what a training process has before its model loads, so its own
    resident memory stands for that part.
    """
    device = device or pick_device()
    splits = load_splits(config)
    check_model(config.base_model)
    path = resolve_model_path(config.base_model)
    dtype = resolve_dtype(config.trainer.precision, device)
    skeleton(path, dtype, config.trust_remote_code)  # imports the modelling code a run imports (~160 MB)
    before_tokenizer = resident_mb()  # a run loads its model before its tokenizer
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    encoded = {name: encode_all(tokenizer, getattr(splits, name), config) for name in ("train", "valid")}
    return estimate_memory(
        config,
        path,
        Lengths.of(encoded["train"], encoded["valid"]),
        dtype=dtype,
        device=device,
        process_mb=resident_mb(),
        loading_process_mb=before_tokenizer,
    )


def run_training(
    config: Config,
    output_dir: str | Path,
    *,
    compare_base: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    device: torch.device | None = None,
    log: Log = print,
    watch: Callable[[Prepared], Sequence[Listener]] | None = None,
) -> dict[str, Any]:
    """Fine-tune as ``config`` says, evaluate before and after on the test split, write the run.

    ``watch`` gets the loaded model, tokenizer and data once they are ready and returns listeners
    told about the training steps (``affinage bench quality`` probes held-out accuracy this way).
    """
    started = time.perf_counter()
    run_dir = RunDir(output_dir)
    splits = load_splits(config)  # bad data fails before anything is written
    eval_sets = load_eval_sets(config)  # and a missing evaluation file too
    check_model(config.base_model)  # and an unknown model name
    if config.trainer.distributed == "fsdp" and config.quantization and distributed.active():
        raise ConfigError(  # bitsandbytes' packed 4-bit weights are not tensors FSDP2 can cut
            "trainer.distributed: fsdp cannot shard a 4-bit (bitsandbytes) base",
            where="trainer.distributed",
            fix="use trainer.distributed: ddp with quantization (each process holds the 4-bit base)",
        )
    main = distributed.is_main()  # under torchrun: rank 0 writes the run and prints, every process computes
    log = log if main else _silent
    # One `train` per run directory (the lock); an unwritable --output fails here, before the model loads.
    with run_dir.locked() if main else nullcontext(run_dir):
        start = distributed.broadcast(run_dir.start(config, overwrite=overwrite) if main else None)
        if start == "finished":  # rank 0 reports it; the others have nothing to read or do
            return _report_finished(run_dir, log) if main else {}
        if start == "resume":
            log(f"resuming the interrupted run in {run_dir.path}")
        for note in splits.notes:
            log(note)
        prepared = _prepare(config, splits, eval_sets, run_dir, device or pick_device(), log)
        if config.trainer.type == "none":
            return _evaluate_only(prepared, run_dir, started, log)
        base_metrics = _evaluate_test(prepared, "base model", log) if compare_base else None
        task_score = _inject_adapter(prepared, log)
        result = fine_tune(
            prepared.model,
            prepared.encoded["train"],
            prepared.encoded.get("valid", []),
            config.trainer,
            pad_id=prepared.tokenizer.pad_token_id,
            paths=run_dir.training,
            base_model_name=config.base_model,
            adapter_dropout=config.adapter.dropout,
            device=prepared.device,
            progress=progress,
            task_score=task_score,
            listeners=watch(prepared) if watch else (),
        )
        _load_best_adapter(prepared.model, run_dir)
        tuned_metrics = _evaluate_test(prepared, "fine-tuned model", log)
        summary = _summary(prepared, result, base_metrics, tuned_metrics, time.perf_counter() - started)
        _write_results(run_dir, base_metrics, tuned_metrics, summary)
        if tuned_metrics:
            log("\n" + comparison_table(base_metrics, tuned_metrics))
        log(
            f"\ntrained {result.steps} steps in {result.train_seconds:.0f}s ({result.train_tokens_per_second:.0f} "
            f"tokens/s, peak {result.peak_memory_mb:.0f} MB); run written to {run_dir.path}"
        )
        return summary


def _evaluate_only(prepared: Prepared, run_dir: RunDir, started: float, log: Log) -> dict[str, Any]:
    """``trainer.type: none`` (Ludwig's): no training; the base model is evaluated on the test split and written
    as a run whose adapter is LoRA at its start (B = 0, or PiSSA's exact split: the base model unchanged), so
    ``eval``, ``predict``, ``compare`` and ``export`` take it like any run."""
    config = prepared.config
    _inject_adapter(prepared, log)
    if distributed.is_main():
        save_adapter(prepared.model, run_dir.adapter_dir, config.base_model, config.adapter.dropout)
    metrics = _evaluate_test(prepared, "base model", log)
    result = TrainResult(
        steps=0,
        train_tokens=0,
        train_seconds=0.0,
        train_tokens_per_second=0.0,
        peak_memory_mb=peak_memory_mb(prepared.device),
        final_train_loss=None,
        best_valid_loss=None,
        best_step=None,
    )
    summary = _summary(prepared, result, metrics, metrics, time.perf_counter() - started)
    _write_results(run_dir, metrics, metrics, summary)
    log(f"trainer.type none: the base model evaluated, not trained; run written to {run_dir.path}")
    return summary


def _write_results(run_dir: RunDir, base: dict | None, tuned: dict | None, summary: dict[str, Any]) -> None:
    """eval.json (when there is a test split) and summary.json, which marks the run finished; rank 0 only."""
    if not distributed.is_main():
        return
    if tuned:
        run_dir.write_eval({"base": base, "fine_tuned": tuned})
    run_dir.finish(summary)


def _silent(message: str) -> None:
    """The log of the processes other than rank 0: rank 0 speaks for the run."""


def _load_best_adapter(model: Any, run_dir: RunDir) -> None:
    """The best validation's adapter (not the last step's), read by rank 0 and sent to every process; a sharded
    model's processes each read it (they share the machine's disk) and keep their piece."""
    distributed.barrier()  # rank 0 has written it
    if is_sharded(model):
        load_adapter(model, run_dir.adapter_dir)
        return
    if distributed.is_main():
        load_adapter(model, run_dir.adapter_dir)
    distributed.broadcast_parameters([p for name, p in model.named_parameters() if "lora_" in name])


def _report_finished(run_dir: RunDir, log: Log) -> dict[str, Any]:
    log(f"{run_dir.path} already holds this finished run: nothing to do (--overwrite trains it again)")
    evaluation = run_dir.read_eval() or {}
    if evaluation.get("fine_tuned"):
        log("\n" + comparison_table(evaluation.get("base"), evaluation["fine_tuned"]))
    return run_dir.read_summary()


def _prepare(
    config: Config,
    splits: DataSplits,
    eval_sets: dict[str, list[Example]],
    run_dir: RunDir,
    device: torch.device,
    log: Log,
) -> Prepared:
    """Task, splits written to the run, the model loaded, the data checked and encoded."""
    task = detect_task(config, splits.train)
    if distributed.is_main():
        run_dir.write_task(task)
        for name in ("train", "valid", "test"):
            run_dir.write_split(name, getattr(splits, name))
    dtype = resolve_dtype(config.trainer.precision, device)
    embedded = embedded_name(config.base_model)
    alias = (
        f" = the embedded {embedded}, a 4-bit GGUF of it" if embedded not in (None, config.base_model.lower()) else ""
    )
    log(f"loading {config.base_model}{alias} ({dtype}, {device})")
    loaded = load_base_model(
        config.base_model,
        dtype=dtype,
        device=device,
        quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
    )
    named = splits.non_empty()
    encoded = {name: encode_all(loaded.tokenizer, examples, config) for name, examples in named.items()}
    prompting = Prompting.from_config(config)
    checks = run_checks(
        loaded.tokenizer,
        named,
        task["labels"],
        prompting,
        config.trainer.max_seq_len,
        encoded,
        near_duplicate_threshold=config.data.split.near_duplicate_threshold,
        eval_sets=eval_sets,
    )
    for warning in checks.warnings:
        log(f"data warning: {warning}")
    if not checks.ok:
        raise DataError(
            "the data check failed:\n  " + "\n  ".join(checks.errors),
            where=str(config.base_dir),
            fix="fix the data: `affinage data check` on the same config (or data folder) lists every problem",
        )
    prepared = Prepared(config, splits, task, loaded.model, loaded.tokenizer, prompting, encoded, device, dtype)
    log(_data_line(prepared) + "\nexample as the model sees it:\n" + preview(loaded.tokenizer, splits.train[0], config))
    return prepared


def _data_line(prepared: Prepared) -> str:
    splits, task, config = prepared.splits, prepared.task, prepared.config
    truncated = sum(e.truncated for name in ("train", "valid") for e in prepared.encoded.get(name, []))
    tokens = sum(len(e.input_ids) for e in prepared.encoded["train"])
    labels = f" ({', '.join(task['labels'])})" if task["labels"] else ""
    return (
        f"data: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test; {tokens} train "
        f"tokens; {truncated} examples truncated to {config.trainer.max_seq_len} tokens; task {task['task']}{labels}"
    )


def _evaluate_test(prepared: Prepared, who: str, log: Log) -> dict[str, Any] | None:
    if not prepared.splits.test:
        return None
    log(f"evaluating the {who} on the test split...")
    metrics = evaluate_examples(
        prepared.model, prepared.tokenizer, prepared.splits.test, prepared.task, prepared.config, prepared.prompting
    )
    if who == "base model":
        log(f"base model: {headline(metrics)} ({metrics['examples_per_second']} examples/s)")
    return metrics


def _inject_adapter(prepared: Prepared, log: Log) -> Callable[[Any], float] | None:
    """LoRA into the model as the config says; returns the validation task score when it picks the best adapter."""
    config, adapter = prepared.config, prepared.config.adapter
    torch.manual_seed(config.trainer.seed)
    targets = inject_lora(
        prepared.model,
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
        share_dropout(prepared.model)
    share_inputs(prepared.model)  # one A product for q/k/v, one for gate/up
    trainable = sum(p.numel() for n, p in prepared.model.named_parameters() if "lora_" in n)
    flags = (
        ("rsLoRA", adapter.use_rslora),
        ("DoRA", adapter.use_dora),
        (f"init={adapter.init}", adapter.init != "default"),
    )
    variant = "".join(f" {name}" for name, on in flags if on)
    where = f"on {len(targets)} layers: {trainable:,} trainable parameters"
    log(f"LoRA{variant} r={adapter.r} alpha={adapter.alpha} {where}")
    if config.trainer.best_metric != "task" or not prepared.splits.valid:
        return None

    def task_score(model: Any) -> float:  # the task metric on the validation split picks the best adapter
        valid = prepared.splits.valid
        metrics = evaluate_examples(
            model, prepared.tokenizer, valid, prepared.task, config, prepared.prompting, with_loss=False
        )
        return task_metric(metrics)

    return task_score


def _summary(
    prepared: Prepared,
    result: TrainResult,
    base: dict[str, Any] | None,
    tuned: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    summary = {
        "base_model": prepared.config.base_model,
        "task": prepared.task["task"],
        "steps": result.steps,
        "train_examples": len(prepared.splits.train),
        "train_tokens": result.train_tokens,
        "truncated_examples": sum(e.truncated for e in prepared.encoded["train"]),
        "train_seconds": result.train_seconds,
        "train_tokens_per_second": result.train_tokens_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "final_train_loss": result.final_train_loss,
        "best_valid_loss": result.best_valid_loss,
        "best_step": result.best_step,
        "best_valid_score": result.best_valid_score,
        "nonfinite_steps": result.nonfinite_steps,
        "packed": result.packed,
        "frozen_prefix_cached": result.frozen_prefix_cached,
        "precision": str(prepared.dtype).replace("torch.", ""),
        "device": str(prepared.device),
        "total_seconds": round(seconds, 1),
    }
    hidden = ("predictions", "per_class", "confusion_matrix")
    for name, metrics in (("base", base), ("fine_tuned", tuned)):
        if metrics:
            summary[f"{name}_test"] = {k: v for k, v in metrics.items() if k not in hidden}
    return summary
