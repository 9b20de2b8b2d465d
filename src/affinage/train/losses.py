"""The training loop: one plain function, read top to bottom.

AdamW on the LoRA factors, linear warm-up then cosine (or linear) decay, gradient
accumulation whose loss is normalised by the number of labelled tokens in the whole
optimizer step (not per micro-batch, which would over-weight short examples), gradient
clipping, periodic validation that keeps the best adapter, and an atomic checkpoint after each
validation so a killed run resumes where it stopped.

Speed comes from not doing useless work: the vocabulary head runs only at positions that
carry a label (for a classifier that is 2-3 positions out of ~100), and batches are length
bucketed so almost no FLOP goes to padding.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from affinage.config import TrainerConfig
from affinage.data.batching import bucketed_batches, collate, collate_packed, padding_share, split_rows
from affinage.data.template import Encoded
from affinage.gated_mlp import recompute_gated_activations
from affinage.lora.layers import mark_only_lora_as_trainable
from affinage.lora.peft_format import adapter_state, save_adapter
from affinage.models import base_model_hub_id
from affinage.prefix_cache import FrozenPrefix, cache_fits, frozen_boundary

PACK_WHEN_PADDING_ABOVE = 0.15  # packing: auto packs when bucketed batches would be this much padding

CPU_TOKENS_PER_FORWARD = 512  # trainer.max_tokens_per_forward: auto on CPU (docs/performance.md)

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, int]]


def get_lr(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _softcap(logits: torch.Tensor, model: nn.Module) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
    logits = _softcap(model.get_output_embeddings()(selected).float(), model)
    return F.cross_entropy(logits, targets[mask], reduction="sum"), int(mask.sum())


def full_logits_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Reference path: full logits at every position (what HF's loss does); for equivalence tests."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum"), int(mask.sum())


@dataclass
class TrainResult:
    steps: int
    train_tokens: int
    train_seconds: float
    train_tokens_per_second: float
    peak_memory_mb: float
    final_train_loss: float | None
    best_valid_loss: float | None
    best_step: int | None
    best_valid_score: float | None = None
    packed: bool = False
    frozen_prefix_cached: bool = False
    truncated: int = 0
    history: list[dict] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve_forward_budget(setting: int | str | None, device: torch.device) -> int | None:
    """Tokens per forward pass: ``auto`` is a budget on CPU (its matmuls are saturated well below
    it, so splitting costs no speed) and none on GPU, where batch size is the user's memory knob."""
    if setting == "auto":
        return CPU_TOKENS_PER_FORWARD if device.type == "cpu" else None
    return setting


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _micro_batches(
    data: Sequence[Encoded], batch_size: int, seed: int, pad_id: int, pack_into: int | None = None
) -> Iterator[tuple[int, dict]]:
    """Endless stream of (epoch, batch), reshuffled every epoch with a seed derived from it.

    With ``pack_into`` the examples of a micro-batch are packed into rows of that many tokens:
    the same examples per step (same schedule, same loss), fewer padding tokens.
    """
    lengths = [len(e.input_ids) for e in data]
    epoch = 0
    while True:
        for indices in bucketed_batches(lengths, batch_size, seed + epoch):
            examples = [data[i] for i in indices]
            yield (
                epoch,
                collate_packed(examples, pad_id, pack_into) if pack_into else collate(examples, pad_id, indices),
            )
        epoch += 1


def _checkpoint_forward(setting: bool | str, batch: dict, budget: int | None) -> bool:
    """Whether this forward recomputes its blocks: always, never, or (auto) when it is a single
    row over the token budget, the one case :func:`split_rows` cannot make smaller."""
    if setting == "auto":
        return budget is not None and batch["input_ids"].numel() > budget
    return bool(setting)


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """transformers' per-block checkpointing (non-reentrant: RNG state and dropout masks replay) while training."""
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    loss_fn: LossFn = causal_lm_loss,
) -> float:
    """Mean per-token loss on ``data`` with dropout off."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _to_device(collate([data[i] for i in chunk], pad_id, chunk), device)
        loss, n = loss_fn(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint" / "state.pt"


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    path = _checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"adapter": adapter_state(model), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **state},
        tmp,
    )
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def _load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    path = _checkpoint_path(run_dir)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state["adapter"].items():
            params[key.removeprefix("base_model.model.")].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


def train(
    model: nn.Module,
    train_data: Sequence[Encoded],
    valid_data: Sequence[Encoded],
    cfg: TrainerConfig,
    *,
    pad_id: int,
    run_dir: Path,
    base_model_name: str,
    adapter_dropout: float = 0.0,
    device: torch.device = torch.device("cpu"),
    loss_fn: LossFn | None = None,
    resume: bool = True,
    progress: bool = True,
    task_score: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Fine-tune the LoRA factors of ``model`` and write the best adapter to ``run_dir/adapter``.

    The best adapter is the one with the lowest validation loss, or with
    ``cfg.best_metric == "task"`` the highest ``task_score(model)`` (accuracy, chrF, pattern
    score on the validation split). ``cfg.early_stopping_patience`` validations without
    improvement end the run.
    """
    loss_fn = loss_fn or (causal_lm_loss if cfg.logits_only_on_labels else full_logits_loss)
    torch.manual_seed(cfg.seed)
    mark_only_lora_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    eval_every = cfg.eval_every or steps_per_epoch

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    state = _load_checkpoint(run_dir, model, optimizer) if resume else None
    step = state["step"] if state else 0
    best = (
        {
            "loss": state["best_loss"],
            "step": state["best_step"],
            "score": state.get("best_score"),
            "stale": state.get("stale", 0),
        }
        if state
        else {"loss": None, "step": None, "score": None, "stale": 0}
    )
    by_task = cfg.best_metric == "task" and task_score is not None
    tokens_done, seconds_done = (state["tokens"], state["seconds"]) if state else (0, 0.0)
    if state is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    elif state is not None and metrics_path.exists():  # drop records of steps the checkpoint does not hold
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    train_loss_fn = valid_loss_fn = loss_fn
    boundary = frozen_boundary(model) if cfg.cache_frozen_blocks and cfg.packing is not True else None
    use_prefix_cache = bool(boundary) and cache_fits(list(train_data) + list(valid_data), model)
    # Packing and the frozen-prefix cache (per example) exclude each other; the cache saves more.
    waste = padding_share([len(e.input_ids) for e in train_data], cfg.batch_size, cfg.seed)
    pack = cfg.packing is True or (cfg.packing == "auto" and not use_prefix_cache and waste > PACK_WHEN_PADDING_ABOVE)
    forward_budget = resolve_forward_budget(cfg.max_tokens_per_forward, device)
    stream = _micro_batches(train_data, cfg.batch_size, cfg.seed, pad_id, pack_into=cfg.max_seq_len if pack else None)
    for _ in range(step * cfg.gradient_accumulation):  # resume at the exact batch the run stopped at
        next(stream)
    if use_prefix_cache:
        started = time.perf_counter()
        prefix = FrozenPrefix(model, boundary)
        train_loss_fn = prefix.wrap(loss_fn, prefix.compute(train_data, cfg.batch_size, pad_id, device))
        valid_loss_fn = prefix.wrap(loss_fn, prefix.compute(valid_data, cfg.batch_size, pad_id, device))
        seconds_done += time.perf_counter() - started  # honest speed: the one-off pass counts as training time

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    if cfg.early_stopping_patience and best["stale"] >= cfg.early_stopping_patience:
        total_steps = step  # the run had already stopped early when it was killed: do not train on
    model.train()
    last_loss = None
    history: list[dict] = []
    # Gated MLPs keep gate and up for backward, not also act(gate): same gradients, less memory.
    with metrics_path.open("a") as log, recompute_gated_activations(model):
        while step < total_steps:
            started = time.perf_counter()
            lr = get_lr(step, total_steps, cfg.learning_rate, warmup_steps, cfg.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(stream) for _ in range(cfg.gradient_accumulation)]
            epoch = micro[-1][0]
            # A micro-batch over the token budget runs as several forwards: same gradient, lower peak.
            batches = [_to_device(chunk, device) for _, batch in micro for chunk in split_rows(batch, forward_budget)]
            # Normalise by the labelled tokens of the whole step so every token weighs the same.
            step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                with activation_checkpointing(
                    model, _checkpoint_forward(cfg.gradient_checkpointing, batch, forward_budget)
                ):
                    loss_sum, _ = train_loss_fn(model, batch)
                    (loss_sum / max(step_tokens, 1)).backward()
                step_loss += float(loss_sum.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            tokens_done += real_tokens
            seconds_done += elapsed
            step += 1
            last_loss = step_loss / max(step_tokens, 1)
            record = {
                "step": step,
                "epoch": epoch,
                "loss": round(last_loss, 5),
                "lr": lr,
                "tokens_per_second": round(real_tokens / elapsed, 1),
            }
            if grad_norm is not None:
                record["grad_norm"] = round(float(grad_norm), 4)
            log.write(json.dumps(record) + "\n")
            history.append(record)
            if valid_data and (step % eval_every == 0 or step == total_steps):
                valid_loss = evaluate_loss(model, valid_data, cfg.batch_size, pad_id, device, valid_loss_fn)
                evaluation = {"step": step, "epoch": epoch, "valid_loss": round(valid_loss, 5)}
                if task_score is not None:
                    evaluation["valid_score"] = round(task_score(model), 4)
                    model.train()
                if by_task:
                    improved = best["score"] is None or evaluation["valid_score"] > best["score"]
                else:
                    improved = best["loss"] is None or valid_loss < best["loss"]
                if improved:
                    best = {"loss": valid_loss, "step": step, "score": evaluation.get("valid_score"), "stale": 0}
                    save_adapter(model, run_dir / "adapter", base_model_hub_id(base_model_name), adapter_dropout)
                else:
                    best["stale"] += 1
                evaluation["best"] = improved
                log.write(json.dumps(evaluation) + "\n")
                history.append(evaluation)
                _save_checkpoint(
                    run_dir,
                    model,
                    optimizer,
                    {
                        "step": step,
                        "best_loss": best["loss"],
                        "best_step": best["step"],
                        "best_score": best["score"],
                        "stale": best["stale"],
                        "tokens": tokens_done,
                        "seconds": seconds_done,
                    },
                )
                if cfg.early_stopping_patience and best["stale"] >= cfg.early_stopping_patience:
                    log.write(json.dumps({"step": step, "early_stop": True, "best_step": best["step"]}) + "\n")
                    break
            log.flush()
            if bar is not None:
                bar.set_postfix(
                    loss=f"{last_loss:.3f}",
                    tok_s=f"{tokens_done / seconds_done:.0f}",
                    **({"val": f"{best['loss']:.3f}"} if best["loss"] is not None else {}),
                )
                bar.update(1)
    if bar is not None:
        bar.close()
    if not valid_data:  # nothing to select on: the last adapter is the result
        save_adapter(model, run_dir / "adapter", base_model_hub_id(base_model_name), adapter_dropout)
    return TrainResult(
        steps=step,
        train_tokens=tokens_done,
        train_seconds=round(seconds_done, 2),
        train_tokens_per_second=round(tokens_done / max(seconds_done, 1e-9), 1),
        peak_memory_mb=round(peak_memory_mb(device), 1),
        final_train_loss=last_loss,
        best_valid_loss=best["loss"],
        best_step=best["step"],
        best_valid_score=best["score"],
        packed=pack,
        frozen_prefix_cached=use_prefix_cache,
        history=history,
    )
