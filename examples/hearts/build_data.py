"""Build the hearts instruction data set from the base model's own answers (no outside data).

Seed 002 trains a model to put one heart between every word of its answers. Here the
questions are ours (``questions.jsonl``, English and French) and the answers come from the
base model itself, asked for short answers; the config's ``hearts`` transform then inserts
the hearts when the data is loaded. The model therefore learns the *style* only, on answers it
could already give.

Writes an mlx-lm style folder: ``train.jsonl`` and ``valid.jsonl`` from ``questions.jsonl``
(90/10), ``test.jsonl`` from ``heldout_questions.jsonl`` (never trained on).

    python examples/hearts/build_data.py --out runs/hearts-data
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from affinage.atomic import write_text_atomic
from affinage.data.formats import Example, alpaca_prompt, read_rows
from affinage.data.prompting import Prompting
from affinage.evaluate import generate
from affinage.models import load_base_model
from affinage.runtime import set_threads

HERE = Path(__file__).parent
SYSTEM = "You are a helpful assistant. Answer in one or two short sentences, in the language of the question."
MAX_WORDS = 45
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def short_answer(text: str) -> str | None:
    """Whole sentences up to MAX_WORDS words, markdown removed; None when nothing usable is left."""
    text = re.sub(r"[*#`_]+", "", text)
    text = " ".join(line.strip(" -•") for line in text.splitlines() if line.strip())
    kept: list[str] = []
    for sentence in SENTENCE_END.split(text.strip()):
        if len(" ".join(kept + [sentence]).split()) > MAX_WORDS:
            break
        kept.append(sentence)
    answer = " ".join(kept).strip()
    words = answer.split()
    if len(words) < 3 or not answer.endswith((".", "!", "?")):
        return None
    if len(set(words)) < len(words) / 2:  # a degenerate, looping answer
        return None
    return answer


def answer_all(rows: list[dict], model, tokenizer, batch_size: int) -> list[dict]:
    examples = [Example(prompt=alpaca_prompt(r["instruction"], r.get("input")), completion="") for r in rows]
    outputs = generate(model, tokenizer, examples, Prompting(system=SYSTEM), max_new_tokens=80, batch_size=batch_size)
    kept = []
    for row, output in zip(rows, outputs):
        answer = short_answer(output)
        if answer:
            kept.append(
                {
                    "instruction": row["instruction"],
                    "input": row.get("input", ""),
                    "output": answer,
                    "lang": row.get("lang"),
                }
            )
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/hearts-data", help="folder for train/valid/test.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = Path(args.out)
    if all((out / f"{name}.jsonl").is_file() for name in ("train", "valid", "test")):
        print(f"{out} already holds the data set (delete it to rebuild)")
        return
    set_threads()
    started = time.perf_counter()
    loaded = load_base_model(args.model)
    questions = [row for _, row in read_rows(HERE / "questions.jsonl")]
    heldout = [row for _, row in read_rows(HERE / "heldout_questions.jsonl")]
    answered = answer_all(questions, loaded.model, loaded.tokenizer, args.batch_size)
    random.Random(args.seed).shuffle(answered)
    n_valid = max(1, len(answered) // 10)
    splits = {
        "train": answered[n_valid:],
        "valid": answered[:n_valid],
        "test": answer_all(heldout, loaded.model, loaded.tokenizer, args.batch_size),
    }
    for name, rows in splits.items():
        write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kept = len(splits["train"]) + len(splits["valid"])
    print(
        f"answered {len(questions) + len(heldout)} questions in {time.perf_counter() - started:.0f}s: "
        f"{kept}/{len(questions)} usable for train/valid, {len(splits['test'])}/{len(heldout)} held out -> {out}"
    )


if __name__ == "__main__":
    main()
