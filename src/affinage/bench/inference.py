"""The inference benchmark (``affinage bench inference``): where users wait, against plain transformers.

Two measurements in one process, on the same model files, dtype and rows (inference keeps no
process-level state, so the sides need no subprocess of their own):

- **label scoring** (examples/s): affinage's :func:`~affinage.evaluate.score_labels` (each prompt
  once, its KV cache shared by the labels) against the per-label loop and the all-labels batch a
  peer writes with plain forwards (:mod:`affinage.bench.inference_peers`); the predicted labels
  must agree;
- **generation** (tokens/s, greedy): affinage's :func:`~affinage.evaluate.generate`, what
  ``predict`` runs, against ``model.generate`` batched with left padding; the answers must agree.

Each side is warmed up once on its first batch, then the median of ``--repeats`` full passes is
reported. affinage's sides run on the model as affinage loads it (:func:`load_base_model`), the
peers' on one loaded with plain ``from_pretrained``.

    affinage bench inference                     # SmolLM2-135M-Instruct, 32 held-out emails
    affinage bench inference --model gemma3-270m
    affinage bench inference --quick             # a tiny random model: keeps the script alive in CI
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from affinage.bench.inference_peers import (
    DESCRIPTIONS,
    SCORING_PEERS,
    answer_text,
    load_plain,
    peer_generate,
    peer_scores,
)
from affinage.bench.machine import cpu_features, device_name, matmul_flops, versions
from affinage.bench.sides import ROOT, quick_model_dir

AGREEMENT = 0.99  # the share of rows on which a peer must answer as affinage does
DEFAULT_ROWS = ROOT / "examples" / "email-router" / "heldout.jsonl"


Runs = dict[str, tuple[Callable[[], Any], Callable[[], Any]]]


def timed(runs: Runs, repeats: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each side's ``warm()`` once, then ``repeats`` rounds of every side's ``run()`` in turn.

    Rounds interleave the sides, so a slower spell of the machine (a neighbour's job) lands on
    all of them rather than on one. Returns each side's last result and its seconds (median,
    fastest, all).
    """
    for _, warm in runs.values():
        warm()
    seconds: dict[str, list[float]] = {side: [] for side in runs}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for side, (run, _) in runs.items():
            started = time.perf_counter()
            results[side] = run()
            seconds[side].append(time.perf_counter() - started)
    return results, {
        side: {
            "seconds": round(statistics.median(s), 4),
            "fastest": round(min(s), 4),
            "repeats": [round(x, 4) for x in s],
        }
        for side, s in seconds.items()
    }


def agreement(a: list[Any], b: list[Any]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / max(len(a), 1), 4)


def scoring(
    args: argparse.Namespace, ours: Any, plain: Any, tokenizer: Any, examples: list, labels: list[str], prompting: Any
) -> dict:
    """Label scoring by each side: examples/s, and how often each peer predicts affinage's label."""
    from affinage.data.template import encode_completion
    from affinage.evaluate import score_labels

    label_ids = [encode_completion(tokenizer, label) for label in labels]
    width = max(len(ids) for ids in label_ids)
    prompts = [prompting.prompt_ids(tokenizer, e, reserve=width) for e in examples]
    first = examples[: args.score_batch]
    runs: Runs = {
        "affinage": (
            lambda: score_labels(ours, tokenizer, examples, labels, prompting, batch_size=args.score_batch),
            lambda: score_labels(ours, tokenizer, first, labels, prompting, batch_size=args.score_batch),
        )
    }
    for side in SCORING_PEERS:
        runs[side] = (
            lambda side=side: peer_scores(side, plain, prompts, label_ids, tokenizer.pad_token_id, args.score_batch),
            lambda side=side: peer_scores(
                side, plain, prompts[: args.score_batch], label_ids, tokenizer.pad_token_id, args.score_batch
            ),
        )
    result: dict[str, Any] = {"rows": len(examples), "labels": labels, "batch_size": args.score_batch, "sides": {}}
    scores, clocks = timed(runs, args.repeats)
    predicted = {side: [labels[k] for k in s.argmax(dim=-1).tolist()] for side, s in scores.items()}
    for side, clock in clocks.items():
        result["sides"][side] = {**clock, "examples_per_second": round(len(examples) / max(clock["seconds"], 1e-9), 2)}
    result["agreement"] = {side: agreement(predicted["affinage"], predicted[side]) for side in SCORING_PEERS}
    result["max_logprob_difference"] = {
        side: round(float((scores["affinage"] - scores[side]).abs().max()), 4) for side in SCORING_PEERS
    }
    gold = [e.completion.strip() for e in examples]
    result["accuracy"] = {side: agreement(gold, predicted[side]) for side in runs}
    result["ratios"] = _ratios(result["sides"], "examples_per_second")
    return result


def generation(args: argparse.Namespace, ours: Any, plain: Any, tokenizer: Any, examples: list, prompting: Any) -> dict:
    """Greedy generation by each side: tokens/s and how many answers are the same text."""
    from affinage.evaluate import generate

    prompts = [prompting.prompt_ids(tokenizer, e, reserve=args.max_new_tokens) for e in examples]
    batch, new = args.gen_batch, args.max_new_tokens
    outputs, sides = timed(
        {
            "affinage": (
                lambda: generate(ours, tokenizer, examples, prompting, max_new_tokens=new, batch_size=batch),
                lambda: generate(ours, tokenizer, examples[:batch], prompting, max_new_tokens=new, batch_size=batch),
            ),
            "transformers-generate": (
                lambda: peer_generate(plain, tokenizer, prompts, new, batch),
                lambda: peer_generate(plain, tokenizer, prompts[:batch], new, batch),
            ),
        },
        args.repeats,
    )
    texts, answers = outputs["affinage"], outputs["transformers-generate"]
    # The work: each answer's tokens through its EOS, counted on the transformers answers (the
    # same answers where they agree); both sides' tokens/s divide this same count.
    tokens = sum(len(a) for a in answers)
    for clock in sides.values():
        clock["tokens_per_second"] = round(tokens / max(clock["seconds"], 1e-9), 1)
    peer_texts = [answer_text(tokenizer, a) for a in answers]
    return {
        "rows": len(examples),
        "batch_size": batch,
        "max_new_tokens": new,
        "generated_tokens": tokens,
        "sides": sides,
        "agreement": {"transformers-generate": agreement(texts, peer_texts)},
        "ratios": _ratios(sides, "tokens_per_second"),
        "samples": [{"affinage": t, "transformers": p} for t, p in list(zip(texts, peer_texts))[:3]],
    }


def _ratios(sides: dict[str, dict], key: str) -> dict[str, float]:
    """affinage's rate over each peer's."""
    ours = sides["affinage"][key]
    return {side: round(ours / max(r[key], 1e-9), 2) for side, r in sides.items() if side != "affinage"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements on one model: loads it twice (affinage's way and plain), then times each side."""
    from affinage.data.formats import load_examples
    from affinage.data.prompting import Prompting
    from affinage.models import load_base_model, resolve_dtype, resolve_model_path
    from affinage.runtime import set_threads

    set_threads()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    everything = load_examples(Path(args.data))
    labels = sorted({e.completion.strip() for e in everything})
    examples = random.Random(args.seed).sample(everything, min(args.rows, len(everything)))  # every label drawn
    prompting = Prompting(max_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(quick_model_dir(Path(tmp), args.model) if args.quick else resolve_model_path(args.model))
        loaded = load_base_model(path, dtype=dtype, device=device)
        plain = load_plain(path, dtype, device)
    ours, tokenizer = loaded.model, loaded.tokenizer
    precision = str(dtype).replace("torch.", "")
    results: dict[str, Any] = {
        "model": args.model if not args.quick else f"tiny random Llama ({args.model}'s tokenizer)",
        "data": str(args.data),
        "machine": {
            "device": device_name(device),
            "cpu_features": cpu_features() if device.type == "cpu" else [],
            "precision": precision,
            "matmul_tflops": round(matmul_flops(dtype, device) / 1e12, 3),
        },
        "versions": versions(("torch", "transformers")),
        "config": describe(args, precision, len(labels)),
    }
    with torch.inference_mode():
        results["scoring"] = scoring(args, ours, plain, tokenizer, examples, labels, prompting)
        results["generation"] = generation(args, ours, plain, tokenizer, examples, prompting)
    return results


def describe(args: argparse.Namespace, precision: str, labels: int) -> dict[str, str]:
    """What each side runs, in words (printed and kept in the JSON)."""
    common = f"{precision}, prompts rendered by affinage (max {args.seq_len} tokens)"
    text = {
        "affinage score_labels": (
            f"left-padded batches of {args.score_batch} prompts sorted by length, one forward each "
            "(head on the last position only), its KV cache repeated per label and only the label tokens "
            "run on top; model from load_base_model (contiguous head input)"
        ),
        "affinage generate": (
            f"affinage.evaluate.generate (what predict runs): batches of {args.gen_batch} prompts sorted by "
            f"length, left-padded, model.generate greedy, max_new_tokens={args.max_new_tokens}"
        ),
    }
    for side in (*SCORING_PEERS, "transformers-generate"):
        text[side] = DESCRIPTIONS[side].format(
            batch=args.score_batch if side in SCORING_PEERS else args.gen_batch, labels=labels, new=args.max_new_tokens
        )
    return {side: f"{words}; {common}" for side, words in text.items()}


def _row(label: str, cells: list[str], width: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip([label, *cells], width))


def table(results: dict[str, Any]) -> str:
    """The two measurements as aligned text tables, with agreements and ratios."""
    lines = []
    machine = results["machine"]
    lines.append(
        f"{results['model']} on {machine['device']} ({', '.join(machine['cpu_features']) or 'no CPU flags read'}), "
        f"{machine['precision']}, matmul ceiling {machine['matmul_tflops']} TFLOP/s"
    )
    for part, key, unit in (
        ("scoring", "examples_per_second", "examples/s"),
        ("generation", "tokens_per_second", "tokens/s"),
    ):
        block = results[part]
        names = list(block["sides"])
        rows = [
            [unit, *(str(block["sides"][n][key]) for n in names)],
            ["median seconds", *(str(block["sides"][n]["seconds"]) for n in names)],
            ["fastest of the repeats (s)", *(str(block["sides"][n]["fastest"]) for n in names)],
            ["agreement with affinage", "-", *(f"{block['agreement'][n]:.1%}" for n in names[1:])],
            ["affinage / side", "-", *(f"{block['ratios'][n]}x" for n in names[1:])],
        ]
        if part == "scoring":
            rows.append(["accuracy (gold labels)", *(f"{block['accuracy'][n]:.1%}" for n in names)])
        width = [max(len(r[i]) for r in [[part, *names], *rows]) for i in range(len(names) + 1)]
        lines += ["", _row(part, names, width), "  ".join("-" * w for w in width)]
        lines += [_row(r[0], r[1:], width) for r in rows]
        if part == "scoring":
            lines.append(
                f"({block['rows']} rows, {len(block['labels'])} labels {block['labels']}, batch {block['batch_size']})"
            )
        else:
            lines.append(
                f"({block['rows']} rows, batch {block['batch_size']}, max_new_tokens {block['max_new_tokens']}, "
                f"{block['generated_tokens']} answer tokens)"
            )
    low = [
        f"{part} {side} {share:.1%}"
        for part in ("scoring", "generation")
        for side, share in results[part]["agreement"].items()
        if share < AGREEMENT
    ]
    if low:
        lines.append(
            f"agreement below {AGREEMENT:.0%} (rounding in {machine['precision']}? try --precision fp32): "
            + "; ".join(low)
        )
    return "\n".join(lines)


def header(results: dict[str, Any]) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    return "\n".join(lines + [f"{side}: {text}" for side, text in results["config"].items()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinage bench inference",
        description="Label scoring (examples/s) and generation (tokens/s): affinage vs plain transformers.",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (any base_model value)")
    parser.add_argument(
        "--data", default=str(DEFAULT_ROWS), help="JSONL rows (default: the email router's held-out emails)"
    )
    parser.add_argument("--rows", type=int, default=32, help="N rows drawn from --data (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="which rows are drawn")
    parser.add_argument("--seq-len", type=int, default=512, help="prompt token budget (longer prompts are cut)")
    parser.add_argument("--score-batch", type=int, default=8, help="examples per scoring batch (every side)")
    parser.add_argument("--gen-batch", type=int, default=16, help="rows per generate call (both sides)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 rows, 8 new tokens: runs, not speed")
    parser.add_argument("--output", help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rows = args.rows if "--rows" in argv else 8
        args.max_new_tokens = args.max_new_tokens if "--max-new-tokens" in argv else 8
        args.gen_batch = args.gen_batch if "--gen-batch" in argv else 4
        args.score_batch = args.score_batch if "--score-batch" in argv else 4
    results = run(args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2) if args.json else header(results) + "\n\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
