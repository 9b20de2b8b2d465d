"""Tokens/s and peak memory against sequence length and batch size, affinage vs each peer.

Each cell is one `affinage bench` invocation (every side, each in its own process, same ids) on
examples of exactly the cell's length: long prompts made of email-router emails, cut by
affinage's truncation (which keeps the answer), loss on the answer. The ceiling fraction is
what each side reaches of the machine's matmul rate (measured at start, in the dtype the sides
train in) for the useful work of a LoRA step: ≈ 4 FLOPs per weight of the decoder's linear
layers per token plus causal attention (≈ 6·L·d per token and block); see affinage.bench.machine.

    python benchmarks/scaling.py                       # the default grid (~1 h on 2 CPU cores)
    python benchmarks/scaling.py --cells 128x2,2048x1 --steps 2
    python benchmarks/scaling.py --cells 512x32,8192x2 --steps 8 --model DIR --device cuda --warmup-steps 2

Flags it does not know (--device, --precision, --sides, --warmup-steps, --side-timeout,
--affinage-checkpointing, ...) go to every `affinage bench` cell as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

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


def cell_row(seq_len: int, batch: int, results: dict) -> dict:
    keep = ("tokens_per_second", "ceiling_fraction", "peak_memory_mb", "peak_reserved_mb", "error")
    return {
        "seq_len": seq_len,
        "batch": batch,
        "sides": {name: {k: r[k] for k in keep if k in r} for name, r in results["sides"].items()},
        "ratios": results["ratios"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| seq len | batch | side | tok/s | of ceiling | peak MB | vs fastest / lightest peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name, side in row["sides"].items():
            ratio, note = row["ratios"], ""
            if name == "affinage" and ratio:
                note = (
                    f"{ratio['tokens_per_second']}x ({ratio['fastest_peer']}) / "
                    f"{ratio['peak_memory']}x ({ratio['lightest_peer']})"
                )
            elif "error" in side:
                note = side["error"].splitlines()[-1]
            fraction = f"{side['ceiling_fraction']:.1%}" if "ceiling_fraction" in side else ""
            peak = f"{side['peak_memory_mb']:,.0f}" if "peak_memory_mb" in side else ""
            lines.append(
                f"| {row['seq_len']} | {row['batch']} | {name} | {side.get('tokens_per_second', '')} | {fraction} "
                f"| {peak} | {note} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated SEQ_LENxBATCH cells")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dropout", default="0.05")
    parser.add_argument("--quick", action="store_true", help="tiny random model (keeps the script alive in CI)")
    parser.add_argument("--json", action="store_true")
    args, extra = parser.parse_known_args(argv)
    cells = [tuple(int(v) for v in cell.split("x")) for cell in args.cells.split(",")]
    rows, machine = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len, batch in cells:
            data = long_prompt_data(Path(tmp) / f"long-{seq_len}.jsonl", rows=batch * args.steps + 2, chars=seq_len * 6)
            forward = [
                *("--model", args.model, "--data", str(data), "--seq-len", str(seq_len)),
                *("--batch-size", str(batch), "--steps", str(args.steps), "--held-out", "2"),
                *("--dropout", args.dropout, *(["--quick"] if args.quick else []), *extra),
            ]
            results = bench.compare(argparse.Namespace(forward=forward))
            machine = {"machine": results["machine"], "versions": results["versions"], "config": results["config"]}
            rows.append(cell_row(seq_len, batch, results))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({**machine, "rows": rows}, indent=2))
        return 0
    print(bench.header(machine))
    m = machine["machine"]
    print(f"{m['device']}, {m['precision']}, matmul {m['matmul_tflops']} TFLOP/s, {args.steps} steps per cell\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
