"""The peers affinage is measured against, each at its best on one axis.

- ``trl-speed``: PEFT + TRL's SFTTrainer set for speed: no activation checkpointing (TRL's
  ``SFTConfig`` turns it on by default), batches grouped by length (less padding, the same
  attention kernel). ``padding_free`` is off: measured on the 2-core CPU it was slower (it
  trades padding for a block-diagonal attention mask; docs/performance.md).
- ``trl-liger``: ``trl-speed`` plus Liger's kernels (RMSNorm, RoPE, SwiGLU), on CUDA where the
  ``liger-kernel`` package is installed.
- ``trl-memory``: SFTTrainer at TRL's defaults, activation checkpointing on: its lightest.
- ``peft-loop``: a plain PEFT loop, no Trainer: ``get_peft_model``, ``model(**batch).loss``
  (HF's loss, full logits at every position), torch AdamW, random batches padded to their
  longest, no checkpointing; bf16 autocast on a GPU, as a hand-written mixed-precision loop has.

All of them train on the token ids affinage rendered, with the same LoRA (rank, alpha, dropout,
all linear layers), batch size, learning rate, clipping and steps as affinage's side.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import random
from pathlib import Path
from typing import Any

import torch

TRL = {  # side -> SFTConfig settings that make it what it is
    "trl-speed": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
    "trl-liger": {
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
        "use_liger_kernel": True,
    },
    "trl-memory": {"gradient_checkpointing": True},
}
PEERS = ["trl-speed", "trl-liger", "trl-memory", "peft-loop"]


def available(side: str, device: torch.device) -> bool:
    if side == "trl-liger":
        return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    return side in PEERS


def describe(side: str, args: argparse.Namespace) -> str:
    """One line: what this side runs, as configured."""
    if side == "affinage":
        checkpointing = {"auto": "only for a row the token budget cannot split nor a quarter of the memory hold"}.get(
            str(args.affinage_checkpointing), str(args.affinage_checkpointing)
        )
        return (
            "affinage's plan and loop at their defaults: head only at labelled positions, length-bucketed "
            "batches (packed when padding > 15 %), fused LoRA update, one dropout mask per input, "
            f"token budget per forward auto (512 on CPU, none on GPU), checkpointing {checkpointing}"
        )
    if side in TRL:
        settings = ", ".join(f"{k}={v!r}" for k, v in TRL[side].items())
        return (
            f"PEFT get_peft_model + TRL SFTTrainer: {settings}, padding_free={args.trl_padding_free}, "
            "optim='adamw_torch_fused'"
        )
    return (
        "PEFT get_peft_model + a plain loop: model(**batch).loss (full logits), torch AdamW (fused), "
        "random padded batches, no Trainer, no checkpointing (bf16 autocast on GPU)"
    )


def lora_config(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _trl(side, model, tokenizer, train_data, args, dtype, workdir: Path, clock) -> tuple[Any, dict]:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]} for e in train_data
    ]
    # TRL masks labels where completion_mask is 0; the first completion token's label sits one
    # position after the prompt in both stacks, so the loss is the same sum over the same tokens.
    peft_model = get_peft_model(model, lora_config(args))
    losses: list[float] = []
    collated: list[int] = []  # real tokens of each batch collated, in order

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            # accelerate's loader collates one batch ahead: count the batch this step trained on.
            clock.step(collated.pop(0))

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        max_length=None if args.trl_padding_free else args.seq_len,  # the ids are already cut to seq_len
        padding_free=args.trl_padding_free,
        completion_only_loss=True,
        dataloader_num_workers=0,
        bf16=dtype == torch.bfloat16,
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        **TRL[side],
    )
    trainer = SFTTrainer(
        model=peft_model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        collated.append(
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    seconds, tokens = clock.timed()
    return peft_model.get_base_model(), {"seconds": seconds, "tokens": tokens, "losses": losses}


def _peft_loop(model, tokenizer, train_data, args, dtype, clock) -> tuple[Any, dict]:
    from peft import get_peft_model

    from affinage.data.batching import collate

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, lora_config(args))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    shuffle, order, losses = random.Random(args.seed), [], []
    clock.start()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += shuffle.sample(range(len(train_data)), len(train_data))
        rows, order = [train_data[i] for i in order[: args.batch_size]], order[args.batch_size :]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        )
        with autocast:
            loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        clock.step(int(batch["attention_mask"].sum()))
    seconds, tokens = clock.timed()
    return peft_model.get_base_model(), {"seconds": seconds, "tokens": tokens, "losses": losses}


def run_peer(side, model, tokenizer, train_data, args, dtype, workdir: Path, clock) -> tuple[Any, dict]:
    """Train ``model`` (loaded, frozen) as ``side`` does; returns the trained model and its timing."""
    if side in TRL:
        return _trl(side, model, tokenizer, train_data, args, dtype, workdir, clock)
    if side == "peft-loop":
        return _peft_loop(model, tokenizer, train_data, args, dtype, clock)
    raise ValueError(f"unknown side {side!r}")
