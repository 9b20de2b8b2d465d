"""Does the merged directory answer like the adapter model? Greedy generations compared.

The merged side uses nothing but transformers: ``AutoModelForCausalLM``, ``AutoTokenizer`` and
``apply_chat_template`` from the saved tokenizer, as any other tool would. The adapter side is
the run as affinage serves it. Prompts are rows of a file (prompt, instruction or messages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def check_merged(
    run_dir: str | Path, merged_dir: str | Path, rows: list[dict[str, Any]], max_new_tokens: int = 16
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from affinage.data.inference import inference_example
    from affinage.evaluate import generate
    from affinage.run import open_run

    run = open_run(run_dir, quantized=False)
    examples = [inference_example(row) for row in rows]
    adapter_outputs = generate(run.model, run.tokenizer, examples, run.prompting, max_new_tokens=max_new_tokens)
    del run

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    merged_outputs = []
    for example in examples:
        messages = list(example.messages or []) + (
            [{"role": "user", "content": example.prompt}] if example.prompt is not None else []
        )
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        merged_outputs.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).rstrip("\ufffd").strip()
        )
    same = [a == m for a, m in zip(adapter_outputs, merged_outputs)]
    return {
        "prompts": len(rows),
        "same_greedy_generation": round(sum(same) / max(len(same), 1), 4),
        "max_new_tokens": max_new_tokens,
        "differences": [{"adapter": a, "merged": m} for a, m, s in zip(adapter_outputs, merged_outputs, same) if not s][
            :10
        ],
    }
