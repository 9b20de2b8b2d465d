"""A transformers model as llama.cpp lays it out: architecture keys and tensors in GGUF order.

Two architectures are written, each with the conventions llama.cpp's reader expects:
- Llama (SmolLM2, Llama 2/3, Mistral-style): the q and k projections are stored in
  llama.cpp's rotary order. Hugging Face keeps each head's rotary pairs as two halves
  (``rotate_half``); llama.cpp rotates adjacent pairs, so the rows of each head are
  interleaved back (``convert_hf_to_gguf.py``'s ``permute``, written here from its definition).
- Gemma 3: RMSNorm weights are stored as ``1 + w`` (Gemma multiplies by ``1 + w``, llama.cpp by
  the stored value); embeddings stay unscaled (llama.cpp scales by √d at run time); the head is
  tied to the embeddings.
Anything llama.cpp cannot express (another rotary scaling, a query scale other than 1/√head_dim)
is refused with the reason, never written approximately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from affinage.errors import AffinageError

MERGED_HINT = "export the merged transformers model instead (`--format merged`)"


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    write_keys: Callable[[gguf.GGUFWriter, Any], None]
    transform: Callable[[str, torch.Tensor, Any], torch.Tensor]


def rope_theta(config: Any, layer_type: str | None = None) -> float:
    """The rotary base, from transformers 5's ``rope_parameters`` (per layer type for Gemma 3) or ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    if params.get("rope_type", "default") != "default":
        raise AffinageError(
            f"rotary scaling '{params['rope_type']}' is not written to GGUF by affinage", fix=MERGED_HINT
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise AffinageError("the model config has no rope_theta", fix=MERGED_HINT)
    return float(theta)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _common_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _llama_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AffinageError("Llama models with bias terms are not written to GGUF by affinage", fix=MERGED_HINT)
    _common_keys(writer, config)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config.vocab_size))


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's two-halves rotary order to llama.cpp's adjacent pairs.

    Row ``i`` of the first half and row ``i`` of the second half of a head become rows ``2i`` and
    ``2i + 1``. It applies to the output rows of q/k projections, and to the rows of a LoRA B
    that feeds them.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_transform(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return rotary_interleave(tensor, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return rotary_interleave(tensor, config.num_key_value_heads)
    return tensor


def _gemma3_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != head_dim(config):
        raise AffinageError(
            f"this Gemma 3 scales queries by 1/√{scalar}, llama.cpp by 1/√head_dim ({head_dim(config)})",
            fix=MERGED_HINT,
        )
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, cap, None):
            raise AffinageError(f"Gemma 3 with {cap} is not written to GGUF by affinage", fix=MERGED_HINT)
    if rope_theta(config, "sliding_attention") != 10000.0:
        raise AffinageError("llama.cpp's Gemma 3 uses a local rotary base of 10000", fix=MERGED_HINT)
    _common_keys(writer, config)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3_transform(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return tensor + 1  # Gemma's RMSNorm multiplies by (1 + w)
    return tensor


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, _llama_keys, _llama_transform),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, _gemma3_keys, _gemma3_transform),
}


def architecture(config: Any) -> Architecture:
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise AffinageError(
            f"GGUF export of '{config.model_type}' models is not supported (supported: {known})", fix=MERGED_HINT
        ) from None


def tensor_name_map(config: Any) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(architecture(config).arch, int(config.num_hidden_layers))


def gguf_tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise AffinageError(f"no GGUF name for the tensor '{hf_name}'", fix=MERGED_HINT)
    return found


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight llama.cpp reads, with the architecture's conventions applied."""
    config = model.config
    arch, names = architecture(config), tensor_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue  # computed by llama.cpp / the same storage as token_embd
        data = arch.transform(hf_name, tensor.detach().to(torch.float32).cpu(), config)
        yield gguf_tensor_name(names, hf_name), data.numpy()
