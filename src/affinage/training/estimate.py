"""Predict a training run's peak memory before any weight is read (``affinage train --estimate``).

The model is built from its config on the ``meta`` device (shapes, no storage) and LoRA injected
into it exactly as a run would, so the frozen weights, the adapter and AdamW's state are counted,
not guessed. Activations are measured, not modelled per architecture: one block of the same
config (real but random weights, a few MB) runs forward under autograd's saved-tensor hooks at
two lengths, giving the bytes a token keeps for backward per block (``a + b * tokens``: the
second term is attention that materialises its scores). The rest is arithmetic over the run's
real lengths and the plan's decisions (token budget, checkpointing, frozen-prefix cache).

On CPU the peak is the process's RSS high-water mark (``VmHWM``, what ``summary.json``
reports), so the estimate adds the process itself and the load peak: a checkpoint's safetensors
file is memory-mapped while a converted (bf16) copy is built, both resident at once.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from affinage.config import Config
from affinage.data.batching import padding_share
from affinage.lora.inject import inject_lora, resolve_layers
from affinage.lora.layers import mark_only_lora_as_trainable
from affinage.training import block_attention, head_loss
from affinage.training.loop import training_forms
from affinage.training.losses import CPU
from affinage.training.plan import PACK_WHEN_PADDING_ABOVE, resolve_forward_budget
from affinage.training.recompute_policy import kept_bytes, recompute_above

MB = 2**20

# RSS of a fresh `python -c "import affinage.pipeline"` (python + torch + transformers + affinage),
# measured with /proc/self/statm on Linux x86-64, torch 2.9, transformers 5: 232-255 MB. The CLI
# measures its own process instead (it has read the same data and tokenizer); this is the fallback.
BASELINE_MB = 240.0

# glibc serves allocations under its mmap threshold (raised as tensors are freed, to 32 MiB at most
# on 64-bit) from its heap, and freed pieces stay resident, fragmented between live tensors: RSS
# grows past the live bytes as forwards of changing widths come and go (docs/performance.md saw
# 1.6 GB of it). The growth is HEAP_GROWTH x the heap-served transients of a step (activations,
# frozen-prefix cache, logits when one fp32 logits tensor is under the threshold; bigger tensors are
# mapped and unmapped, never retained). 5.0 is fitted on whole runs on this machine: the email
# router (Gemma 3, 363 steps), the 2048-token cell, hearts and three email-router ablations (each
# run's own factor 3.4-7.4): see docs/performance.md "Predicting memory".
HEAP_GROWTH = 5.0
MMAP_THRESHOLD_MAX = 32 * MB

PROBE_TOKENS = (64, 128)  # lengths the one-block probe runs at; two points fit a + b * tokens


@dataclass
class MemoryEstimate:
    """Predicted memory of one training process, in MB (``peak_mb`` is what ``VmHWM`` should read)."""

    process_mb: float  # python, torch, transformers, tokenizer and data: before the model loads
    weights_mb: float  # the frozen base model as it sits in memory (4-bit linears for QLoRA)
    adapter_mb: float  # the LoRA factors (fp32)
    optimizer_mb: float  # their fp32 gradients and AdamW's two fp32 moments
    activations_mb: float  # saved for backward by one forward pass, plus one block's transients
    logits_mb: float  # the vocabulary head at labelled positions, its softmax and gradient
    prefix_cache_mb: float  # frozen-prefix hidden states of every train + valid example
    validation_mb: float  # what the validation loss's logits need beyond a training step's transients
    heap_mb: float  # allocator growth over a run (HEAP_GROWTH x the heap-served transients of a step)
    load_peak_mb: float  # while loading: the mapped checkpoint file + the converted copy
    tokens_per_forward: int
    checkpointing: bool
    world_size: int = 1
    on_gpu: bool = False  # CUDA's peak is torch.cuda.max_memory_allocated: no process, heap or mapped file
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak_mb(self) -> float:
        host = 0.0 if self.on_gpu else self.process_mb + self.heap_mb
        return (
            host
            + self.weights_mb
            + self.adapter_mb
            + self.optimizer_mb
            + self.activations_mb
            + self.logits_mb
            + self.prefix_cache_mb
            + self.validation_mb
        )

    @property
    def peak_mb(self) -> float:
        return self.train_peak_mb if self.on_gpu else max(self.train_peak_mb, self.load_peak_mb)

    def table(self) -> str:
        """The parts as a small terminal table, per process."""
        rows = [
            ("process (python, torch, tokenizer, data)", self.process_mb),
            ("base weights", self.weights_mb),
            ("LoRA adapter (fp32)", self.adapter_mb),
            ("gradients + AdamW moments", self.optimizer_mb),
            (
                f"activations ({self.tokens_per_forward} tokens/forward"
                f"{', checkpointed' if self.checkpointing else ''})",
                self.activations_mb,
            ),
            ("logits at labelled tokens", self.logits_mb),
            ("frozen-prefix cache", self.prefix_cache_mb),
            ("validation logits beyond a step's", self.validation_mb),
            ("allocator growth over the run", self.heap_mb),
            ("= training peak", self.train_peak_mb),
            ("loading peak (mapped file + converted copy)", self.load_peak_mb),
        ]
        scope = f"per process ({self.world_size} processes, WORLD_SIZE)" if self.world_size > 1 else "one process"
        rows.append((f"predicted peak, {scope}", self.peak_mb))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value:>8.0f} MB" for name, value in rows]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def resident_mb() -> float:
    """This process's resident memory now (``/proc/self/statm``; the high-water mark where there is no /proc)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def skeleton(model_path: Path | str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules and parameter shapes from its config alone: no storage, nothing read but config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def inject_adapter(model: nn.Module, adapter: Any, layers: Any = "config") -> list[str]:
    """LoRA as ``adapter`` (an AdapterConfig) says; PiSSA's SVD cannot run on meta, its shapes are the default's."""
    init = "default" if adapter.init == "pissa" else adapter.init
    names = inject_lora(
        model,
        adapter.target_modules,
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        layers=adapter.layers_to_transform if layers == "config" else layers,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        init=init,
        rank_pattern=adapter.rank_pattern,
        alpha_pattern=adapter.alpha_pattern,
    )
    mark_only_lora_as_trainable(model)
    return names


def weight_bytes(model: nn.Module, quantization: Any = None) -> int:
    """The frozen weights in memory; with 4-bit QLoRA the block linears hold 0.5 byte/param plus
    one absmax per 64 weights (fp32, or 8-bit with double quantization)."""
    frozen = [p for name, p in model.named_parameters() if "lora_" not in name]  # a tied weight once
    total = sum(p.numel() * p.element_size() for p in frozen)
    if quantization is None:
        return total
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and "lora_" not in name
    }
    per_param = 1.0 if quantization.bits == 8 else 0.5 + (1 if quantization.double_quant else 4) / 64
    for p in frozen:
        if id(p) in quantized:
            total -= p.numel() * p.element_size() - int(p.numel() * per_param)
    return total


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lowest_adapted_block(model: nn.Module, adapter: Any) -> int:
    """Backward stops at the lowest adapted block: blocks below it keep no activations."""
    total = model.config.get_text_config().num_hidden_layers
    layers = resolve_layers(model, adapter.layers_to_transform)
    if layers is None:
        return 0
    return min(layers) if layers else total


def _one_block_config(text_config: Any) -> Any:
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    config.vocab_size = 64
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, 0)
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"]
    return config


def probe_block(
    text_config: Any,
    adapter: Any,
    dtype: torch.dtype,
    tokens: Sequence[int] = PROBE_TOKENS,
    blockwise: bool = True,
) -> list[int]:
    """Bytes autograd keeps for backward in one adapted block, one forward of 2 rows x ``n`` tokens, per ``n``.

    The second row is one token shorter, so the attention mask path of padded batches is the one measured.
    ``blockwise``: blockwise attention (it keeps its probabilities) or SDPA; the other training forms always.
    """
    from transformers import AutoModelForCausalLM

    config = _one_block_config(text_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inject_adapter(model, adapter, layers=None)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = []
    for n in tokens:
        mask = torch.ones((2, n), dtype=torch.long)
        mask[1, -1] = 0
        measured.append(_saved_bytes(model, torch.ones((2, n), dtype=torch.long), mask, weights, blockwise))
    return measured


def _saved_bytes(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, weights: set[int], blockwise: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward (the weights themselves excluded)."""
    decoder = model.get_decoder()
    with training_forms(model, blockwise):
        hidden, saved = kept_bytes(
            lambda: decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, weights
        )
    hidden.float().sum().backward()
    return saved


@dataclass(frozen=True)
class Lengths:
    """What the estimate needs of the encoded data: tokens and labelled tokens per example."""

    train: list[int]
    train_labels: list[int]
    valid: list[int]
    valid_labels: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, train: Sequence[Any], valid: Sequence[Any]) -> Lengths:
        return cls(
            train=[len(e.input_ids) for e in train],
            train_labels=[sum(label != -100 for label in e.labels[1:]) for e in train],
            valid=[len(e.input_ids) for e in valid],
            valid_labels=[sum(label != -100 for label in e.labels[1:]) for e in valid],
        )


def forward_shape(lengths: Lengths, cfg: Any, device: torch.device, cached: bool) -> tuple[int, int, int]:
    """(rows, width, labelled tokens) of the largest forward pass."""
    budget = resolve_forward_budget(cfg.max_tokens_per_forward, device)
    longest = max(lengths.train)
    pack = cfg.packing is True or (
        cfg.packing == "auto"
        and not cached
        and padding_share(lengths.train, cfg.batch_size, cfg.seed) > PACK_WHEN_PADDING_ABOVE
    )
    width = cfg.max_seq_len if pack else longest
    rows = min(cfg.batch_size, len(lengths.train))
    if budget is not None and rows * width > budget and rows > 1:
        rows = max(1, budget // width)
    if pack:  # a packed row holds several examples: the data's share of labelled tokens
        labels = math.ceil(rows * width * sum(lengths.train_labels) / max(1, sum(lengths.train)))
    else:
        labels = sum(sorted(lengths.train_labels, reverse=True)[:rows])
    return rows, width, labels


def heap_served(logit_count: int, element: int) -> int:
    """The logits' bytes glibc serves from its heap: the head's output in the run's dtype and the three
    fp32 tensors (copy, log-softmax, gradient) each count only when one of them is under the mmap threshold."""
    low = logit_count * element if logit_count * element < MMAP_THRESHOLD_MAX else 0
    return low + (logit_count * 12 if logit_count * 4 < MMAP_THRESHOLD_MAX else 0)


def heap_served_head(labels: int, vocab: int, element: int, chunked: bool, transient: int) -> int:
    """The head's transients glibc serves from its heap: the stock logits (:func:`heap_served`), or the chunked
    head's ``transient`` bytes when one chunk's fp32 logits are under the mmap threshold."""
    if not chunked:
        return heap_served(labels * vocab, element)
    return transient if labels * head_loss.chunk_rows(element, labels) * 4 < MMAP_THRESHOLD_MAX else 0


def stored_dtype(model_path: Path | str) -> str | None:
    """The checkpoint's dtype as config.json names it (``float32``): loading in another one builds a copy."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    text = config.get("text_config") or {}
    found = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return str(found).removeprefix("torch.") if found else None


def file_bytes(model_path: Path | str) -> int:
    """The checkpoint's weight files: memory-mapped while the model loads, so resident in RSS."""
    path = Path(model_path)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def estimate_memory(
    config: Config,
    model_path: Path | str,
    lengths: Lengths,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    process_mb: float = BASELINE_MB,
    loading_process_mb: float | None = None,
) -> MemoryEstimate:
    """Predicted peak memory of training ``config`` on data of ``lengths`` (one process)."""
    model = skeleton(model_path, dtype, config.trust_remote_code)
    text_config = model.config.get_text_config()
    weights = weight_bytes(model, config.quantization)  # before injection: the frozen base only
    inject_adapter(model, config.adapter)
    trainable = trainable_parameters(model)
    cfg = config.trainer
    lowest = lowest_adapted_block(model, config.adapter)
    depth = text_config.num_hidden_layers - lowest
    embeddings_train = any(p.requires_grad for p in model.get_input_embeddings().parameters())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = world > 1 and getattr(cfg, "distributed", "ddp") == "fsdp"
    cached = cfg.cache_frozen_blocks and cfg.packing is not True and lowest > 0 and not embeddings_train and not sharded
    rows, width, labels = forward_shape(lengths, cfg, device, cached)
    tokens = rows * width
    element = torch.empty((), dtype=dtype).element_size()
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    blockwise = block_attention.would_run(rows, heads, width, dtype, device)
    short, long = probe_block(text_config, config.adapter, dtype, blockwise=blockwise)
    (n1, n2), rows_probed = PROBE_TOKENS, 2
    slope = max(0.0, (long / (rows_probed * n2) - short / (rows_probed * n1)) / (n2 - n1))  # attention scores
    per_token = short / (rows_probed * n1) - slope * n1
    block = tokens * (per_token + slope * width)  # one block's saved tensors at this shape
    budget = resolve_forward_budget(cfg.max_tokens_per_forward, device)
    above = recompute_above(cfg.gradient_checkpointing, budget, tokens, lambda n: depth * n * (per_token + slope * n))
    checkpointing = above is not None and tokens > above
    if checkpointing:  # each block keeps its input; one block is recomputed at a time
        activations = depth * tokens * hidden * element + 2 * block
    else:
        activations = (depth + 1) * block  # + one block's worth of gradients in flight
    vocab = text_config.vocab_size
    chunked = cfg.logits_only_on_labels and head_loss.chunkable_head(model.get_output_embeddings(), dtype, device)
    logits = head_loss.transient_bytes(labels, vocab, hidden, element, chunked)
    # The validation loss runs whole micro-batches (no token budget), without grad.
    valid_labels = sum(sorted(lengths.valid_labels, reverse=True)[: cfg.batch_size])
    validation = head_loss.transient_bytes(valid_labels, vocab, hidden, element, chunked, gradient=False)
    prefix = (sum(lengths.train) + sum(lengths.valid)) * hidden * element if cached else 0
    loaded = weights if config.quantization is not None else file_bytes(model_path)  # QLoRA: the 4-bit checkpoint
    converts = config.quantization is not None or stored_dtype(model_path) != str(dtype).removeprefix("torch.")
    load_peak = (loading_process_mb or process_mb) * MB + loaded + (weights if converts else 0)
    if sharded:  # FSDP2: each process keeps 1/world of every weight, and gathers one block at a time
        weights = weights // world + weights // max(1, text_config.num_hidden_layers)
        trainable = trainable // world
    estimate = MemoryEstimate(
        process_mb=process_mb,
        weights_mb=weights / MB,
        adapter_mb=trainable * 4 / MB,
        optimizer_mb=trainable * 3 * 4 / MB,
        activations_mb=activations / MB,
        logits_mb=logits / MB,
        prefix_cache_mb=prefix / MB,
        validation_mb=max(0.0, validation - activations - logits) / MB,
        heap_mb=HEAP_GROWTH * (activations + prefix + heap_served_head(labels, vocab, element, chunked, logits)) / MB,
        load_peak_mb=load_peak / MB,
        tokens_per_forward=tokens,
        checkpointing=checkpointing,
        world_size=world,
        on_gpu=device.type == "cuda",
    )
    if sharded:
        estimate.notes.append(f"fsdp: weights, adapter and AdamW sharded over {world} processes (not measured)")
    if estimate.on_gpu:
        estimate.notes.append("on CUDA the peak is GPU memory (max_memory_allocated): process, heap and load left out")
    return estimate
