"""Merge a run's adapter into its base weights: a plain transformers model directory.

The result loads with ``AutoModelForCausalLM``/``AutoTokenizer`` alone (no affinage, no PEFT),
ships the chat template the run was trained with (see ``chat_template``), and its generation
config stops on the tokenizer's EOS, so greedy generations match the adapter model's
(``affinage merge --check FILE`` measures it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from affinage.atomic import atomic_directory
from affinage.export.chat_template import run_chat_template
from affinage.export.outputs import guard_output
from affinage.lora.inject import fuse_lora


def merge_run(run_dir: str | Path, output_dir: str | Path) -> dict[str, Any]:
    from affinage.run import open_run

    guard_output(Path(output_dir), "affinage_merge.json", Path(run_dir))  # never over the run or a user's directory
    run = open_run(run_dir, quantized=False)  # a 4-bit base is merged into its full-precision weights
    fuse_lora(run.model)
    with atomic_directory(Path(output_dir)) as tmp:
        return save_merged(run, tmp)


def save_merged(run: Any, directory: Path) -> dict[str, Any]:
    """Write ``run``'s model (its adapter already fused) and tokenizer as a plain transformers directory."""
    model, tokenizer = run.model, run.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    template, template_note, _ = run_chat_template(tokenizer, run.config.prompt.template, run.config.prompt.system)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    info = {
        "chat_template": template_note,
        "merged_from": Path(run.path).resolve().name,
        "base_model": run.config.base_model,
        "prompt_template": run.config.prompt.template,
        "system": run.config.prompt.system,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "dequantized_base": run.config.quantization is not None,
    }
    (directory / "affinage_merge.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return info
