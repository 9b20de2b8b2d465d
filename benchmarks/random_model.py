"""A model directory of random weights with a real model's shape, for speed and memory only.

Where the real weights cannot travel (a GPU machine with no network, a file limit), the work
of a training step depends only on the shapes: build them from a preset and a tokenizer dir.

    python benchmarks/random_model.py --preset smollm2-135m --tokenizer TOKENIZER_DIR --out /tmp/smollm2-random
    python benchmarks/random_model.py --preset llama-1b --tokenizer TOKENIZER_DIR --out /tmp/llama-1b --device cuda

Presets: ``smollm2-135m`` (SmolLM2-135M's config: 30 blocks, hidden 576, 9 heads, 3 KV heads,
vocabulary 49,152, tied embeddings) and ``llama-1b`` (Llama 3.2 1B's shape: 16 blocks, hidden
2048, MLP 8192, 32 heads, 8 KV heads, vocabulary 128,256, tied). The tokenizer's ids must fit
the vocabulary (SmolLM2's 49,152 ids fit both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

PRESETS = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
    },
}


def build(preset: str, tokenizer_dir: Path, out: Path, dtype: torch.dtype, device: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    settings = dict(PRESETS[preset])
    rope_theta = settings.pop("rope_theta")
    config = LlamaConfig(
        **settings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} ids, more than the preset's {config.vocab_size}")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a directory holding the tokenizer's files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="where to draw the weights (cuda is faster for 1B)")
    args = parser.parse_args(argv)
    path = build(args.preset, args.tokenizer, args.out, getattr(torch, args.dtype), args.device)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
