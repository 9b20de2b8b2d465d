"""Tokens/s and peak memory against sequence length and batch size, HF PEFT + TRL vs affinage.

Each cell is one `affinage bench` invocation (both stacks, each in its own process, same ids)
on examples of exactly the cell's length: long prompts made of email-router emails, cut by
affinage's truncation (which keeps the answer), loss on the answer. The ceiling column is what
the machine's matmul throughput allows for a LoRA step: forward + backward through activations
≈ 4 FLOPs per weight of the linear layers per token, plus causal attention (≈ 6·L·d per token
and block), at the fp32/bf16 matmul rate measured at start.

    python benchmarks/scaling.py                       # the default grid (~30 min on 2 CPU cores)
    python benchmarks/scaling.py --cells 128x2,2048x1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from affinage import bench

DEFAULT_CELLS = "128x2,256x2,512x2,1024x2,2048x2,256x1,256x4,256x16"


def long_prompt_data(path: Path, rows: int, chars: int) -> Path:
    """``rows`` prompt/completion rows, each prompt at least ``chars`` characters of emails."""
    from affinage.data.formats import load_examples

    emails = load_examples(bench.DEFAULT_DATA)
    with path.open("w", encoding="utf-8") as out:
        for row in range(rows):
            parts, start = [], row
            while sum(len(p) for p in parts) < chars:
                parts.append(emails[start % len(emails)].prompt)
                start += 1
            out.write(
                json.dumps({"prompt": "\n\n".join(parts), "completion": emails[row % len(emails)].completion}) + "\n"
            )
    return path


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def model_shape(model_name: str) -> tuple[int, int, int]:
    """Weights in the decoder's linear layers, hidden size, blocks."""
    from affinage.models import load_base_model

    model = load_base_model(model_name).model
    config = model.config.get_text_config()
    linear = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    return linear, config.hidden_size, config.num_hidden_layers


def ceiling_tokens_per_second(shape: tuple[int, int, int], seq_len: int, flops: float) -> float:
    linear, hidden, blocks = shape
    return flops / (4 * linear + 6 * seq_len * hidden * blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated SEQ_LENxBATCH cells")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model (keeps the script alive in CI; no ceiling)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cells = [tuple(int(v) for v in cell.split("x")) for cell in args.cells.split(",")]
    flops = matmul_flops(torch.float32)
    shape = None if args.quick else model_shape(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len, batch in cells:
            data = long_prompt_data(Path(tmp) / f"long-{seq_len}.jsonl", rows=batch * args.steps + 2, chars=seq_len * 6)
            forward = [
                "--model",
                args.model,
                "--data",
                str(data),
                "--seq-len",
                str(seq_len),
                "--batch-size",
                str(batch),
                "--steps",
                str(args.steps),
                "--held-out",
                "2",
                "--dropout",
                "0.05",
            ] + (["--quick"] if args.quick else [])
            results = bench.compare(argparse.Namespace(forward=forward))
            peft, ours = results["peft"], results["affinage"]
            rows.append(
                {
                    "seq_len": seq_len,
                    "batch": batch,
                    "peft_tokens_per_second": peft["tokens_per_second"],
                    "affinage_tokens_per_second": ours["tokens_per_second"],
                    "speed_ratio": results["ratios"]["tokens_per_second"],
                    "peft_peak_mb": peft["peak_memory_mb"],
                    "affinage_peak_mb": ours["peak_memory_mb"],
                    "memory_ratio": results["ratios"]["peak_memory"],
                    "ceiling_tokens_per_second": round(ceiling_tokens_per_second(shape, seq_len, flops), 1)
                    if shape
                    else None,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"matmul_tflops_fp32": round(flops / 1e12, 3), "rows": rows}, indent=2))
        return 0
    print(f"fp32 matmul: {flops / 1e12:.3f} TFLOP/s, {args.steps} steps per cell")
    print(
        "| seq len | batch | PEFT+TRL tok/s | affinage tok/s | speed "
        "| PEFT+TRL peak MB | affinage peak MB | memory | ceiling tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq_len']} | {r['batch']} | {r['peft_tokens_per_second']} | {r['affinage_tokens_per_second']} "
            f"| {r['speed_ratio']}x | {r['peft_peak_mb']:.0f} | {r['affinage_peak_mb']:.0f} | {r['memory_ratio']}x "
            f"| {r['ceiling_tokens_per_second']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
