"""What the benchmark reports about the machine: library versions, the matmul ceiling, the work per token.

The ceiling is one large square matrix product in the dtype the sides train in (fp32 on an
AVX2 CPU, bf16 on a GPU), timed after a warm-up, the device synchronised. A side's fraction of
it counts the model FLOPs of a LoRA step, the work its maths needs whoever runs it: forward +
backward through the activations of the decoder's frozen linear layers (≈ 4 FLOPs per weight
per token: they get no gradient), the adapter's factors (6 per factor weight and token: forward,
input gradient and their own gradient, as any trained weight), and causal attention (≈ 6·L·d
per token and block). The vocabulary head is left out: the peers run it at every position,
affinage only at labelled ones, and that saving is not counted as work done. Before 2026-11-30
the adapter's FLOPs were left out too (~6 % of the work at rank 16 on SmolLM2):
:func:`flops_per_token` with ``adapter=False`` gives that count.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Iterable

import torch

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "liger-kernel")


def versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions as Python would import them (the first distribution on sys.path); absent ones left out."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(dtype: torch.dtype, device: torch.device | str = "cpu", size: int | None = None) -> float:
    """FLOP/s of ``size``² products (2048 on CPU, 8192 on a GPU), mean of several after a warm-up."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    repeats = 10 if device.type == "cuda" else 5
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3 if device.type == "cuda" else 1):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def model_shape(model: torch.nn.Module, rank: int = 0) -> dict[str, int]:
    """Weights in the decoder's linear layers (the head excluded), the weights of a rank-``rank`` LoRA on
    every one of them (r·(in+out) each), hidden size, blocks."""
    config = model.config.get_text_config()
    linears = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    return {
        "linear_weights": sum(m.weight.numel() for m in linears),
        "adapter_weights": rank * sum(m.in_features + m.out_features for m in linears),
        "hidden": config.hidden_size,
        "blocks": config.num_hidden_layers,
    }


def attention_length(lengths: Iterable[int]) -> float:
    """The sequence length a token attends over, averaged over tokens: sum(L²) / sum(L)."""
    lengths = list(lengths)
    return sum(n * n for n in lengths) / max(sum(lengths), 1)


def flops_per_token(shape: dict[str, int], attention_len: float, adapter: bool = True) -> float:
    """Model FLOPs of a LoRA training step per token (see the module's docstring); ``adapter=False``: the
    count before 2026-11-30, without the adapter's own work."""
    factors = 6 * shape.get("adapter_weights", 0) if adapter else 0
    return 4 * shape["linear_weights"] + factors + 6 * attention_len * shape["hidden"] * shape["blocks"]


CPU_FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_features() -> list[str]:
    """The matmul-relevant flags /proc/cpuinfo lists (bf16 is fast only with AMX or AVX512-BF16)."""
    try:
        flags = set(open("/proc/cpuinfo", encoding="utf-8").read().split())
    except OSError:
        return []
    return [name for name in CPU_FEATURES if name in flags]
