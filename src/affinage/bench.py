"""The training benchmark: the same LoRA fine-tune with HF PEFT + TRL's SFTTrainer and with affinage.

Both sides get the same model, the same token ids (rendered once by affinage's template, loss on
the completion only, EOS appended), rank, targets, dropout, batch size, learning rate, AdamW and
number of steps. Each side runs in its own subprocess so peak RSS is its own. Reported per side:
tokens/s (real, non-padding tokens over the time spent in training steps, model loading
excluded), seconds per step, peak memory, the mean training loss of the last steps and the loss
on held-out examples after training (computed the same way for both). Then the ratios.

    python benchmarks/train_speed.py                # embedded model, email-router data
    python benchmarks/train_speed.py --quick        # tiny random model: keeps the script alive in CI
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT / "examples" / "email-router" / "emails.jsonl"


def _encoded_data(tokenizer: Any, data: Path, seq_len: int, seed: int, held_out: int = 32) -> tuple[list, list]:
    """Every example rendered once by affinage (both sides train on these ids); ``held_out`` kept aside."""
    from affinage.data.formats import load_examples
    from affinage.data.template import encode_example

    examples = load_examples(data)
    random.Random(seed).shuffle(examples)
    encoded = [encode_example(tokenizer, e, seq_len) for e in examples]
    return encoded[held_out:], encoded[:held_out]


def _quick_model_dir(workdir: Path) -> Path:
    """A 2-block Llama with the embedded model's tokenizer, random weights, saved as a model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from affinage.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
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


def _peft_trl(
    model: Any, tokenizer: Any, train_data: list, args: argparse.Namespace, dtype: torch.dtype, workdir: Path
) -> tuple[Any, dict]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]} for e in train_data
    ]
    # TRL masks labels where completion_mask is 0; the first completion token's label sits one
    # position after the prompt in both stacks, so the loss is the same sum over the same tokens.
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    timing = {"seconds": 0.0, "tokens": 0, "losses": []}
    collated: list[int] = []  # real tokens of each batch collated, in order

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timing["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            timing["seconds"] += time.perf_counter() - timing["start"]
            # accelerate's loader collates one batch ahead: count the batch this step trained on.
            timing["tokens"] += collated.pop(0)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                timing["losses"].append(float(logs["loss"]))

    config = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        max_length=args.seq_len,
        completion_only_loss=True,
        dataloader_num_workers=0,
        bf16=dtype == torch.bfloat16,
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
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
    return peft_model.get_base_model(), {
        "seconds": timing["seconds"],
        "tokens": timing["tokens"],
        "losses": timing["losses"],
    }


def _affinage(model: Any, tokenizer: Any, train_data: list, args: argparse.Namespace) -> tuple[Any, dict]:
    """affinage's plan and loop, as the recipe runs them, with no file written (no checkpoint, no adapter)."""
    from affinage.config import TrainerConfig
    from affinage.lora.inject import inject_lora
    from affinage.lora.layers import share_dropout
    from affinage.training import BatchPlan, History, TrainState, lora_optimizer, run_plan

    torch.manual_seed(args.seed)
    inject_lora(model, "all-linear", r=args.rank, alpha=args.alpha, dropout=args.dropout)
    if not args.independent_dropout:
        share_dropout(model)  # affinage's default (adapter.shared_dropout_mask)
    config = TrainerConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_seq_len=args.seq_len,
        seed=args.seed,
    )
    device = torch.device(args.device)
    torch.manual_seed(config.seed)
    optimizer = lora_optimizer(model, config)
    plan = BatchPlan.build(model, train_data, [], config, pad_id=tokenizer.pad_token_id, device=device)
    history = History()
    state = TrainState(seconds=plan.setup_seconds)  # the one-off frozen-prefix pass counts, as in the recipe
    state = run_plan(model, plan, optimizer, config, state=state, listeners=[history], device=device)
    losses = [r["loss"] for r in history.records if "loss" in r]
    return model, {"seconds": state.seconds, "tokens": state.tokens, "losses": losses}


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side of the benchmark, in this process."""
    from affinage.models import load_base_model, resolve_dtype
    from affinage.runtime import set_threads
    from affinage.training import evaluate_loss, peak_memory_mb

    set_threads()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_name = str(_quick_model_dir(workdir)) if args.quick else args.model
        loaded = load_base_model(model_name, dtype=dtype, device=device)
        train_data, held_out = _encoded_data(loaded.tokenizer, Path(args.data), args.seq_len, args.seed, args.held_out)
        if args.only == "peft":
            model, timing = _peft_trl(loaded.model, loaded.tokenizer, train_data, args, dtype, workdir)
        else:
            model, timing = _affinage(loaded.model, loaded.tokenizer, train_data, args)
        held_out_loss = evaluate_loss(model, held_out, args.batch_size, loaded.tokenizer.pad_token_id, device)
    tail = timing["losses"][-5:]
    return {
        "side": args.only,
        "device": str(device),
        "precision": str(dtype).replace("torch.", ""),
        "steps": args.steps,
        "tokens": timing["tokens"],
        "train_seconds": round(timing["seconds"], 2),
        "tokens_per_second": round(timing["tokens"] / max(timing["seconds"], 1e-9), 1),
        "seconds_per_step": round(timing["seconds"] / args.steps, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "last_train_loss": round(sum(tail) / max(len(tail), 1), 4),
        "held_out_loss": round(held_out_loss, 4),
    }


SIDES = {"peft": "PEFT + TRL", "affinage": "affinage"}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Both sides, one after the other, each in a fresh subprocess; then the ratios."""
    results = {}
    for side in SIDES:
        command = [sys.executable, "-m", "affinage.bench", "--only", side] + args.forward
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{SIDES[side]} side failed:\n{done.stderr[-3000:]}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    peft, ours = results["peft"], results["affinage"]
    results["ratios"] = {
        "tokens_per_second": round(ours["tokens_per_second"] / max(peft["tokens_per_second"], 1e-9), 2),
        "peak_memory": round(ours["peak_memory_mb"] / max(peft["peak_memory_mb"], 1e-9), 2),
        "held_out_loss": round(ours["held_out_loss"] / max(peft["held_out_loss"], 1e-9), 3),
    }
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("", SIDES["peft"], SIDES["affinage"], "affinage / PEFT")]
    ratios = results["ratios"]
    for key, label, ratio in (
        ("tokens_per_second", "tokens/s (real tokens)", ratios["tokens_per_second"]),
        ("seconds_per_step", "seconds per step", None),
        ("peak_memory_mb", "peak memory (MB)", ratios["peak_memory"]),
        ("last_train_loss", "train loss (last 5 steps)", None),
        ("held_out_loss", "held-out loss after training", ratios["held_out_loss"]),
    ):
        rows.append(
            (label, str(results["peft"][key]), str(results["affinage"][key]), f"{ratio}x" if ratio is not None else "")
        )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    p, ours = results["peft"], results["affinage"]
    lines.append(
        f"({p['steps']} steps, {p['device']}, {p['precision']}; tokens: PEFT {p['tokens']}, affinage {ours['tokens']})"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinage bench", description="LoRA training speed and memory: affinage vs HF PEFT + TRL."
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (any base_model value)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL data (default: the email-router emails)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--seq-len", type=int, default=512, help="maximum sequence length (longer examples are truncated)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--held-out", type=int, default=32, help="examples kept aside to compare the trained adapters' loss"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--independent-dropout", action="store_true", help="affinage side: one dropout mask per layer, as PEFT"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 3 steps: checks the script runs, not speed"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=list(SIDES), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick and "--steps" not in argv:
        args.steps = 3
    if args.only:
        print(json.dumps(run_side(args)))
        return 0
    args.forward = [a for a in argv if a != "--json"] + (["--steps", str(args.steps)] if "--steps" not in argv else [])
    results = compare(args)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
