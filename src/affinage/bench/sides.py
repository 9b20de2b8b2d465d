"""One side of the benchmark, run in this process: the shared setup, the clock, and affinage's side.

Every side gets the same model files, the same token ids (rendered once by affinage's template,
loss on the completion only, EOS appended), rank, alpha, targets, dropout, batch size, learning
rate (AdamW, constant) and number of steps. What differs is the training stack and its settings
(:mod:`affinage.bench.peers` for the others).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from affinage.bench.machine import attention_length, model_shape

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA = ROOT / "examples" / "email-router" / "emails.jsonl"


def encoded_data(tokenizer: Any, data: Path, seq_len: int, seed: int, held_out: int = 32) -> tuple[list, list]:
    """Every example rendered once by affinage (all sides train on these ids); ``held_out`` kept aside."""
    from affinage.data.formats import load_examples
    from affinage.data.template import encode_example

    examples = load_examples(data)
    random.Random(seed).shuffle(examples)
    encoded = [encode_example(tokenizer, e, seq_len) for e in examples]
    return encoded[held_out:], encoded[:held_out]


def quick_model_dir(workdir: Path, tokenizer_source: str) -> Path:
    """A 2-block Llama of random weights with ``tokenizer_source``'s tokenizer, saved as a model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from affinage.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(tokenizer_source))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = workdir / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class StepClock:
    """Wall-clock time and real tokens per optimizer step, the same for every side.

    A step ends when its optimizer update is done: the device is synchronised there, so queued
    GPU work is counted in the step that queued it. The time between steps (fetching and
    collating the next batch) counts too. The first ``warmup`` steps (kernel selection, lazy
    initialisation) are left out of the rate.
    """

    def __init__(self, device: torch.device, warmup: int = 0) -> None:
        self.device, self.warmup = device, warmup
        self.marks: list[float] = []
        self.tokens: list[int] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def step(self, tokens: int) -> None:
        self.marks.append(self._now())
        self.tokens.append(tokens)

    def timed(self) -> tuple[float, int]:
        """(seconds, real tokens) of the steps after the warm-up ones."""
        skip = min(self.warmup, max(len(self.tokens) - 1, 0))
        return self.marks[-1] - self.marks[skip], sum(self.tokens[skip:])


def affinage_side(
    model: Any, tokenizer: Any, train_data: list, args: argparse.Namespace, clock: StepClock
) -> tuple[Any, dict]:
    """affinage's plan and loop, as the recipe runs them, with no file written (no checkpoint, no adapter)."""
    from affinage.config import TrainerConfig
    from affinage.lora.inject import inject_lora
    from affinage.lora.layers import share_dropout
    from affinage.lora.shared_input import share_inputs
    from affinage.training import BatchPlan, History, Listener, TrainState, lora_optimizer, run_plan
    from affinage.training.listeners import HeapTrim

    torch.manual_seed(args.seed)
    inject_lora(model, "all-linear", r=args.rank, alpha=args.alpha, dropout=args.dropout)
    if not args.independent_dropout:
        share_dropout(model)  # affinage's default (adapter.shared_dropout_mask)
    share_inputs(model)
    config = TrainerConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_seq_len=args.seq_len,
        seed=args.seed,
        gradient_checkpointing=args.affinage_checkpointing,
    )
    device = torch.device(args.device)
    torch.manual_seed(config.seed)
    optimizer = lora_optimizer(model, config)

    class Clocked(Listener):
        def on_start(self, state):
            clock.start()

        def on_step(self, state, report):
            clock.step(report.tokens)

    plan = BatchPlan.build(
        model, train_data, [], config, pad_id=tokenizer.pad_token_id, device=device, prefix_up_front=True
    )
    history = History()
    state = TrainState(seconds=plan.setup_seconds)
    trim = [HeapTrim()] if device.type == "cpu" else []  # as the recipe does on a CPU
    run_plan(model, plan, optimizer, config, state=state, listeners=[history, Clocked(), *trim], device=device)
    seconds, tokens = clock.timed()
    return model, {
        "seconds": seconds + plan.setup_seconds,  # the frozen-prefix pass, run up front here, counts
        "tokens": tokens,
        "losses": [r["loss"] for r in history.records if "loss" in r],
        "packed": plan.packed,
        "frozen_prefix_cached": plan.prefix_cached,
    }


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side of the benchmark, in this process."""
    from affinage.bench import peers
    from affinage.models import load_base_model, resolve_dtype
    from affinage.runtime import set_threads
    from affinage.training import evaluate_loss, peak_memory_mb

    set_threads()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    clock = StepClock(device, args.warmup_steps)
    result: dict[str, Any] = {"side": args.only, "device": str(device), "precision": str(dtype).replace("torch.", "")}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_name = str(quick_model_dir(workdir, args.model)) if args.quick else args.model
        loaded = load_base_model(model_name, dtype=dtype, device=device)
        train_data, held_out = encoded_data(loaded.tokenizer, Path(args.data), args.seq_len, args.seed, args.held_out)
        result["shape"] = model_shape(loaded.model, rank=args.rank)
        result["attention_length"] = round(attention_length(len(e.input_ids) for e in train_data), 1)
        model, tokenizer = loaded.model, loaded.tokenizer
        try:
            if args.only == "affinage":
                model, timing = affinage_side(model, tokenizer, train_data, args, clock)
            else:
                model, timing = peers.run_peer(args.only, model, tokenizer, train_data, args, dtype, workdir, clock)
        except torch.OutOfMemoryError:
            result["error"] = "out of memory"
            result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
            return result
        peak = peak_memory_mb(device)  # training's peak (the weights in), before the held-out pass
        if device.type == "cuda":
            result["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        with torch.no_grad():
            held_out_loss = evaluate_loss(model, held_out, args.batch_size, tokenizer.pad_token_id, device)
    tail = timing.pop("losses")[-5:]
    seconds, tokens = timing.pop("seconds"), timing.pop("tokens")
    result.update(
        {
            "steps": args.steps,
            "timed_steps": args.steps - min(args.warmup_steps, args.steps - 1),
            "tokens": tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "seconds_per_step": round(seconds / max(args.steps - min(args.warmup_steps, args.steps - 1), 1), 4),
            "peak_memory_mb": round(peak, 1),
            "last_train_loss": round(sum(tail) / max(len(tail), 1), 4),
            "held_out_loss": round(held_out_loss, 4),
            **timing,
        }
    )
    return result
