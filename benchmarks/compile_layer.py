"""Eager against inductor (``torch.compile``) on one stock SmolLM2-shaped Llama decoder layer, forward + backward.

Why: what the fp32 ceiling fraction lacks on a CPU whose matmul ceiling is high is memory-bound
elementwise work; a compiler that fuses it is the one lever left. This measures how much of a
layer's time inductor wins, on frozen weights (the input's gradient only, as LoRA training's
base layers), in one process, alternating the two.

    python benchmarks/compile_layer.py --batch 1 --seq-len 512
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1
    )
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).float().requires_grad_(False)
    x = torch.randn(args.batch, args.seq_len, cfg.hidden_size, requires_grad=True)
    positions = torch.arange(args.seq_len)[None].expand(args.batch, -1)
    rotary = LlamaRotaryEmbedding(cfg)(x, positions)

    def step(forward) -> None:
        out = forward(x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        x.grad = None

    def milliseconds(forward) -> float:
        for _ in range(3):
            step(forward)
        started = time.perf_counter()
        for _ in range(args.reps):
            step(forward)
        return (time.perf_counter() - started) / args.reps * 1e3

    started = time.perf_counter()
    compiled = torch.compile(layer)
    step(compiled)
    print(f"{args.batch} x {args.seq_len} rows, compiled in {time.perf_counter() - started:.1f} s")
    for _ in range(2):
        eager_ms, compiled_ms = milliseconds(layer), milliseconds(compiled)
        print(f"eager {eager_ms:.2f} ms, inductor {compiled_ms:.2f} ms: {eager_ms / compiled_ms:.2f}x")


if __name__ == "__main__":
    main()
