"""Write a merged model as one GGUF file with the ``gguf`` package (no llama.cpp build at export time).

Quantization is what ``gguf.quants`` can write: ``f16``, ``q8_0`` (the default: near-lossless,
half of f16) and ``q4_0``. One-dimensional tensors (norms) stay float32 as llama.cpp's own
converter keeps them; a matrix whose rows do not fill whole 32-value blocks falls back to f16;
with ``q4_0`` the embeddings and head stay ``q8_0`` because they set every logit. K-quants
(Q4_K_M...) need llama.cpp's ``llama-quantize`` on the f16 file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from affinage.atomic import write_file_atomic
from affinage.errors import AffinageError
from affinage.export.gguf_model import architecture, gguf_tensors
from affinage.export.gguf_vocab import GGUFVocab

Q = gguf.GGMLQuantizationType
QUANTS: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
K_QUANT_HINT = (
    "K-quants (q4_k_m, q5_k_m, q6_k...) need llama.cpp: export --quant f16, then run "
    "`llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M`"
)


def check_quant(quant: str) -> None:
    if quant.lower() not in QUANTS:
        hint = K_QUANT_HINT if "_k" in quant.lower() else f"use one of {', '.join(QUANTS)}"
        raise AffinageError(f"unknown GGUF quantization '{quant}'", where="--quant", fix=hint)


def tensor_type(name: str, array: np.ndarray, quant: str) -> Q:
    """The storage type of one tensor under ``quant``."""
    wanted = QUANTS[quant][0]
    if array.ndim < 2 or wanted == Q.F32:
        return Q.F32
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return Q.F16
    return wanted


def encode(array: np.ndarray, kind: Q) -> np.ndarray:
    if kind == Q.F32:
        return array.astype(np.float32)
    if kind == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), kind)


def write_model_gguf(
    path: Path,
    model: Any,
    vocab: GGUFVocab,
    *,
    quant: str = "q8_0",
    chat_template: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (merged, any dtype) to ``path`` atomically; returns what was written."""
    check_quant(quant)
    quant = quant.lower()
    arch = architecture(model.config)
    counts: dict[str, int] = {}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        arch.write_keys(writer, model.config)
        writer.add_file_type(QUANTS[quant][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(writer)
        if chat_template:
            writer.add_chat_template(chat_template)
        for tensor_name, array in gguf_tensors(model):
            kind = tensor_type(tensor_name, array, quant)
            counts[kind.name] = counts.get(kind.name, 0) + 1
            writer.add_tensor(tensor_name, encode(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomic(path, write)
    return {
        "file": str(path),
        "quant": quant,
        "architecture": gguf.MODEL_ARCH_NAMES[arch.arch],
        "tensor_types": counts,
        "bytes": path.stat().st_size,
    }
