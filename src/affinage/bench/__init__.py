"""The training benchmark: the same LoRA fine-tune with affinage and with each peer at its best.

Sides (:mod:`affinage.bench.peers` says what each one runs): ``affinage``; ``trl-speed`` (PEFT +
TRL's SFTTrainer set for speed: no activation checkpointing); ``trl-liger`` (the same with
Liger's kernels, on CUDA where installed); ``trl-memory`` (TRL's defaults, checkpointing on: its
lightest); ``peft-loop`` (PEFT with a plain loop, no Trainer). All get the same model, token ids,
LoRA, batch size, learning rate and steps (:mod:`affinage.bench.sides`), each in its own
subprocess so its peak memory is its own. Reported per side: tokens/s (real, non-padding tokens
over the wall-clock of the timed steps, the device synchronised at each step's end, warm-up
steps left out), peak memory (RSS on CPU, allocated on CUDA), losses, and the fraction of the
machine's matmul ceiling reached (:mod:`affinage.bench.machine`). Ratios: affinage's tokens/s
over the FASTEST peer's, its peak memory over the LIGHTEST peer's.

    python benchmarks/train_speed.py                # embedded model, email-router data
    python benchmarks/train_speed.py --quick        # tiny random model: keeps the script alive in CI

``affinage bench inference`` (or ``--inference``) is the inference benchmark instead: label
scoring and generation against plain transformers (:mod:`affinage.bench.inference`).
``affinage bench quality``: wall-clock to a held-out accuracy, affinage's recipe vs PEFT + TRL's
(:mod:`affinage.bench.quality`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch

from affinage.bench import peers
from affinage.bench.machine import device_name, flops_per_token, matmul_flops, versions
from affinage.bench.sides import DEFAULT_DATA, run_side

__all__ = ["DEFAULT_DATA", "build_parser", "compare", "main", "run_side", "table"]

SIDES = ["affinage", *peers.PEERS]


def default_sides(device: torch.device) -> list[str]:
    return ["affinage"] + [side for side in peers.PEERS if peers.available(side, device)]


def _run(side: str, forward: list[str], timeout: float | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "affinage.bench", "--only", side] + forward
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:g} s"}
    if done.returncode != 0:
        return {"side": side, "error": done.stderr.strip()[-3000:] or f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every side, one after the other, each in a fresh subprocess; the ceiling; then the ratios."""
    parsed = build_parser().parse_args(args.forward)
    device = torch.device(parsed.device)
    from affinage.models import resolve_dtype
    from affinage.runtime import set_threads

    set_threads()  # the ceiling with the threads each side gets
    dtype = resolve_dtype(parsed.precision, device)
    sides = parsed.sides.split(",") if parsed.sides else default_sides(device)
    results: dict[str, Any] = {
        "machine": {
            "device": device_name(device),
            "precision": str(dtype).replace("torch.", ""),
            "matmul_tflops": round(matmul_flops(dtype, device) / 1e12, 3),
        },
        "versions": versions(),
        "config": {side: peers.describe(side, parsed) for side in sides},
        "sides": {},
    }
    for side in sides:
        results["sides"][side] = _run(side, args.forward, parsed.side_timeout)
    ceiling = results["machine"]["matmul_tflops"] * 1e12
    for result in results["sides"].values():
        if "tokens_per_second" in result:
            for key, adapter in (("ceiling_fraction", True), ("ceiling_fraction_without_adapter", False)):
                work = flops_per_token(result["shape"], result["attention_length"], adapter)
                result[key] = round(result["tokens_per_second"] * work / ceiling, 4)
    results["ratios"] = ratios(results["sides"])
    return results


def ratios(sides: dict[str, dict]) -> dict[str, Any]:
    """affinage over the fastest peer (tokens/s) and over the lightest peer (peak memory)."""
    ours = sides.get("affinage", {})
    done = {name: r for name, r in sides.items() if name != "affinage" and "tokens_per_second" in r}
    if "tokens_per_second" not in ours or not done:
        return {}
    fastest = max(done, key=lambda name: done[name]["tokens_per_second"])
    lightest = min(done, key=lambda name: done[name]["peak_memory_mb"])
    return {
        "fastest_peer": fastest,
        "tokens_per_second": round(ours["tokens_per_second"] / max(done[fastest]["tokens_per_second"], 1e-9), 2),
        "lightest_peer": lightest,
        "peak_memory": round(ours["peak_memory_mb"] / max(done[lightest]["peak_memory_mb"], 1e-9), 2),
        "held_out_loss": {
            name: round(ours["held_out_loss"] / max(r["held_out_loss"], 1e-9), 3) for name, r in done.items()
        },
    }


ROWS = (
    ("tokens_per_second", "tokens/s (real tokens)"),
    ("ceiling_fraction", "fraction of matmul ceiling"),
    ("seconds_per_step", "seconds per timed step"),
    ("peak_memory_mb", "peak memory (MB)"),
    ("last_train_loss", "train loss (last 5 steps)"),
    ("held_out_loss", "held-out loss after training"),
)


def table(results: dict[str, Any]) -> str:
    sides = results["sides"]
    names = list(sides)
    rows = [["", *names]]
    for key, label in ROWS:
        rows.append([label, *(str(sides[n].get(key, "failed" if "error" in sides[n] else "")) for n in names)])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    machine, ratio = results["machine"], results["ratios"]
    first = next((r for r in sides.values() if "steps" in r), {})
    lines.append(
        f"({first.get('steps')} steps, {first.get('timed_steps')} timed; {machine['device']}, {machine['precision']}, "
        f"matmul ceiling {machine['matmul_tflops']} TFLOP/s; real tokens timed: "
        + ", ".join(f"{n} {sides[n].get('tokens')}" for n in names)
        + ")"
    )
    if ratio:
        lines.append(
            f"affinage / fastest peer ({ratio['fastest_peer']}): {ratio['tokens_per_second']}x tokens/s; "
            f"affinage / lightest peer ({ratio['lightest_peer']}): {ratio['peak_memory']}x peak memory"
        )
    for name in names:
        if "error" in sides[name]:
            lines.append(f"{name} failed: {sides[name]['error'].splitlines()[-1]}")
    return "\n".join(lines)


def header(results: dict[str, Any]) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    lines += [f"{side}: {text}" for side, text in results["config"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinage bench",
        description="LoRA training speed and memory: affinage vs PEFT + TRL at their best. "
        "`affinage bench inference` (or --inference): label scoring and generation vs plain transformers.",
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
        "--warmup-steps", type=int, default=None, help="first steps left out of tokens/s (default: 1 on GPU, 0 on CPU)"
    )
    parser.add_argument("--sides", help=f"comma-separated, of {','.join(SIDES)} (default: all available)")
    parser.add_argument("--side-timeout", type=float, help="seconds a side may take; past it, it is reported failed")
    parser.add_argument(
        "--independent-dropout", action="store_true", help="affinage side: one dropout mask per layer, as PEFT"
    )
    parser.add_argument(
        "--affinage-checkpointing",
        default="auto",
        choices=["auto", "true", "false"],
        help="affinage side: trainer.gradient_checkpointing",
    )
    parser.add_argument(
        "--trl-padding-free",
        action="store_true",
        help="TRL sides: padding_free=True (one flattened row per batch; off by default, slower where measured)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 3 steps: checks the script runs, not speed"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inference"] or "--inference" in argv:  # the inference benchmark: its own flags
        from affinage.bench.inference import main as inference_main

        return inference_main(argv[1:] if argv[:1] == ["inference"] else [a for a in argv if a != "--inference"])
    if argv[:1] == ["quality"]:  # time to a held-out accuracy, affinage's recipe vs PEFT + TRL's
        from affinage.bench.quality import main as quality_main

        return quality_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.quick and "--steps" not in argv:
        args.steps = 3
    if args.warmup_steps is None:
        args.warmup_steps = 1 if torch.device(args.device).type == "cuda" else 0
    args.affinage_checkpointing = {"true": True, "false": False}.get(args.affinage_checkpointing, "auto")
    if args.only:
        print(json.dumps(run_side(args)))
        return 0
    args.forward = [a for a in argv if a != "--json"] + (["--steps", str(args.steps)] if "--steps" not in argv else [])
    results = compare(args)
    print(json.dumps(results, indent=2) if args.json else header(results) + "\n\n" + table(results))
    return 1 if any("error" in r for r in results["sides"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
