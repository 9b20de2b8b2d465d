"""A PEFT-format LoRA adapter as a llama.cpp adapter GGUF (``llama-cli --lora``, Ollama's ``ADAPTER``).

llama.cpp adds ``scale · B·A·x`` with ``scale = alpha / rank`` read per tensor pair, A stored
as ``(r, in)`` and B as ``(out, r)`` (the PEFT shapes, no transpose). What it cannot express is
refused, naming the merged export that can:
- DoRA (a magnitude vector), LoRA on embeddings or on a head tied to them;
- an ``alpha_pattern`` (one alpha per file), rsLoRA with several ranks (``alpha·√r`` is exact
  for one rank only).
For Llama, the q/k projections' output rows are in llama.cpp's rotary order, so B's rows get
the same interleave as the base weights (A, on the input side, is untouched).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from affinage.atomic import write_file_atomic
from affinage.errors import AffinageError
from affinage.export.gguf_model import architecture, gguf_tensor_name, tensor_name_map
from affinage.lora.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config

MERGED_FIX = "export the merged model instead: --format gguf (or --format ollama without --adapter)"


def lora_alpha(adapter_config: dict[str, Any], ranks: set[int]) -> float:
    """The single alpha llama.cpp applies as ``alpha / rank``; refuses what one alpha cannot say."""
    where = CONFIG_NAME
    if adapter_config.get("use_dora"):
        raise AffinageError(
            "a DoRA adapter has a magnitude vector llama.cpp's LoRA cannot apply", where=where, fix=MERGED_FIX
        )
    alphas = set((adapter_config.get("alpha_pattern") or {}).values()) - {adapter_config["lora_alpha"]}
    if alphas:
        raise AffinageError(
            "per-module alphas (alpha_pattern) cannot be written as one llama.cpp adapter alpha",
            where=where,
            fix=MERGED_FIX,
        )
    alpha = float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        if len(ranks) != 1:
            raise AffinageError("rsLoRA with several ranks has no single llama.cpp alpha", where=where, fix=MERGED_FIX)
        alpha *= math.sqrt(next(iter(ranks)))  # alpha/sqrt(r) == (alpha*sqrt(r))/r
    return alpha


def adapter_pairs(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": tensor, "B": tensor}}`` from the adapter's safetensors file."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(directory / WEIGHTS_NAME)).items():
        name = key.removeprefix(PREFIX)
        for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if name.endswith(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[kind] = tensor.to(torch.float32)
                break
        else:
            raise AffinageError(
                f"the adapter holds '{key}', which a llama.cpp LoRA adapter cannot carry "
                "(LoRA on embeddings, DoRA, or saved base weights)",
                where=WEIGHTS_NAME,
                fix=MERGED_FIX,
            )
    return pairs


def write_adapter_gguf(path: Path, adapter_dir: Path, model_config: Any) -> dict[str, Any]:
    """Write ``adapter_dir`` (PEFT format) for a base with ``model_config`` to ``path``, atomically."""
    adapter_config = read_adapter_config(adapter_dir)
    pairs = adapter_pairs(adapter_dir)
    arch, names = architecture(model_config), tensor_name_map(model_config)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    if tied and "lm_head" in pairs:
        raise AffinageError("LoRA on a head tied to the embeddings has no llama.cpp form", fix=MERGED_FIX)
    alpha = lora_alpha(adapter_config, {pair["A"].shape[0] for pair in pairs.values()})
    tensors = [
        (gguf_tensor_name(names, f"{module}.weight"), _oriented(module, pair, model_config))
        for module, pair in sorted(pairs.items())
    ]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, (a, b) in tensors:
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomic(path, write)
    return {"file": str(path), "alpha": alpha, "tensor_pairs": len(tensors), "bytes": path.stat().st_size}


def _oriented(module: str, pair: dict[str, torch.Tensor], config: Any) -> tuple[np.ndarray, np.ndarray]:
    """A as ``(r, in)``, B as ``(out, r)``, B's rows in the base tensor's GGUF order."""
    a, b = pair["A"], pair["B"]
    b = architecture(config).transform(f"{module}.weight", b, config)  # the Llama q/k rotary interleave of the rows
    return a.contiguous().numpy(), b.contiguous().numpy()
