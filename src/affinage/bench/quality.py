"""Time to quality: wall-clock from ``train`` to a held-out accuracy, affinage's recipe vs PEFT + TRL's.

Tokens/s at equal work is not what a user feels; the time until the model is good enough is.
Each side trains the same model on the same training split with its own recipe (affinage's:
the email router's config; the peer's: ``benchmarks/time-to-quality/peft-trl.yaml``, the best
PEFT + TRL recipe found for this model and data), each in its own subprocess, one after the
other. Every ``--probe-every`` optimizer steps both are measured on the same held-out emails by
the same scorer with their clock stopped (:mod:`affinage.bench.quality_sides`). A side's time to
quality is its clock at the first probe at or above ``--threshold``; the ratio is the peer's
time over affinage's. A side that never reaches it within its recipe gives a lower bound.

    affinage bench quality                  # the email router, Gemma 3 270M (~20 min on 2 cores)
    affinage bench quality --quick          # a tiny random model: keeps the script alive in CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from affinage.bench.machine import versions
from affinage.bench.quality_sides import RECIPES, ROOT

SIDES = ("affinage", "peft-trl")


def time_to_threshold(probes: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first probe at or above ``threshold`` (its step, seconds, accuracy), or None."""
    return next((p for p in probes if p["accuracy"] >= threshold), None)


def summarise(sides: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Each side's time to the threshold and the peer's over affinage's (``>=`` when the peer never got there)."""
    reached = {name: time_to_threshold(side.get("probes", []), threshold) for name, side in sides.items()}
    ours, peer = reached.get("affinage"), reached.get("peft-trl")
    summary: dict[str, Any] = {"threshold": threshold, "reached": reached}
    if ours and peer:
        summary["ratio"] = round(peer["seconds"] / max(ours["seconds"], 1e-9), 2)
    elif ours and sides.get("peft-trl", {}).get("probes"):
        # never reached: the peer's whole clock so far is a lower bound on its time to quality
        summary["ratio_at_least"] = round(sides["peft-trl"]["probes"][-1]["seconds"] / max(ours["seconds"], 1e-9), 2)
    return summary


def _run(side: str, forward: list[str], timeout: float | None) -> dict[str, Any]:
    """One side in a fresh subprocess; a side that fails or times out keeps the probes it logged."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "probes.jsonl"
        command = [sys.executable, "-m", "affinage.bench", "quality", "--only", side, "--probe-log", str(log), *forward]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            done = None
        if done is not None and done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        probes = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if done is None:
        return {"error": f"timed out after {timeout:g} s", "probes": probes}
    return {"error": done.stderr.strip()[-3000:] or f"exit status {done.returncode}", "probes": probes}


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side, in this process (the subprocess ``_run`` starts)."""
    from affinage.bench.quality_sides import run_affinage, run_peer
    from affinage.bench.sides import quick_model_dir
    from affinage.runtime import set_threads

    set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        quick_model = quick_model_dir(workdir, "smollm2-135m-instruct") if args.quick else None
        run = run_affinage if args.only == "affinage" else run_peer
        return run(args, quick_model, workdir)


def table(results: dict[str, Any]) -> str:
    summary, lines = results["summary"], []
    for name, side in results["sides"].items():
        if "error" in side:
            lines.append(f"{name}: failed: {side['error'].splitlines()[-1]}")
            if not side.get("probes"):
                continue
        curve = ", ".join(f"{p['step']}:{p['accuracy']:.3f}@{p['seconds']:.0f}s" for p in side["probes"])
        hit = summary["reached"].get(name)
        when = f"{hit['seconds']:.0f} s (step {hit['step']})" if hit else "not reached"
        lines.append(f"{name}: {when}; peak {side.get('peak_memory_mb')} MB; probes step:accuracy@seconds {curve}")
    if "ratio" in summary:
        lines.append(f"time to {summary['threshold']:.0%} held-out accuracy: peft-trl / affinage = {summary['ratio']}x")
    elif "ratio_at_least" in summary:
        lines.append(f"peft-trl never reached {summary['threshold']:.0%}: ratio >= {summary['ratio_at_least']}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinage bench quality",
        description="Wall-clock from train to a held-out accuracy: affinage's recipe vs PEFT + TRL's, one run.",
    )
    parser.add_argument("--recipe", default=str(RECIPES / "affinage.yaml"), help="affinage's recipe (a config)")
    parser.add_argument(
        "--peer-recipe", default=str(RECIPES / "peft-trl.yaml"), help="PEFT + TRL's recipe: lora + sft keywords"
    )
    parser.add_argument("--threshold", type=float, default=0.95, help="held-out accuracy to reach")
    parser.add_argument("--probe-every", type=int, default=36, help="optimizer steps between accuracy probes")
    parser.add_argument(
        "--probe-sets", default="heldout,heldout-short", help="the recipe's eval.sets names the probes score"
    )
    parser.add_argument("--probe-examples", type=int, default=None, help="score only the first N rows of each set")
    parser.add_argument("--set-affinage", action="append", help="KEY=VALUE override of affinage's recipe")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES)}")
    parser.add_argument(
        "--time-limit", type=float, help="seconds on a side's clock after which it stops at its next probe"
    )
    parser.add_argument("--side-timeout", type=float, help="seconds a side may take; past it, it is reported failed")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 steps: checks the script runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--probe-log", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:  # every probe passes: the point is that both sides run end to end
        args.threshold, args.probe_every, args.probe_examples = 0.0, 2, args.probe_examples or 8
    if args.only:
        print(json.dumps(run_side(args)))
        return 0
    forward = [a for a in argv if a != "--json"]
    results: dict[str, Any] = {"versions": versions(), "args": vars(args), "sides": {}}
    for side in args.sides.split(","):
        results["sides"][side] = _run(side, forward, args.side_timeout)
    results["summary"] = summarise(results["sides"], args.threshold)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 1 if any("error" in side for side in results["sides"].values()) else 0
