"""Ludwig's LLM config, key for key (issue 16): v0.10 and the 0.17 line.

A Ludwig user's config is read as Ludwig means it. A key affinage has under another name is
moved there (``adapter.init_lora_weights: pissa`` -> ``adapter.init: pissa``); a Ludwig key
affinage cannot honour is refused saying what it does and what to use instead, never as an
"unknown key". This runs on the raw mapping, before the schema validates it; one module per
section of Ludwig's schema. docs/ludwig.md has the table.
"""

from __future__ import annotations

import copy
from typing import Any

from affinage.ludwig.adapter import translate_adapter, translate_model_parameters, translate_quantization
from affinage.ludwig.common import refuse
from affinage.ludwig.data import translate_features, translate_preprocessing
from affinage.ludwig.decoder import translate_decoder
from affinage.ludwig.generation import translate_generation
from affinage.ludwig.prompt import translate_prompt
from affinage.ludwig.trainer import translate_trainer

__all__ = ["refuse", "translate_ludwig"]

# Top-level Ludwig sections affinage has no counterpart for: key -> (what it does, what to use instead).
SECTIONS = {
    "hyperopt": (
        "a hyperparameter search over many trainings",
        "train each candidate with `affinage train CONFIG --set key=value --output runs/NAME` and compare the runs "
        "(`affinage compare`)",
    ),
    "combiner": ("combining several encoded inputs (ECD models)", "remove it: an LLM reads one prompt"),
    "defaults": (
        "default settings per feature type",
        "write the settings on the feature itself (input_features/output_features)",
    ),
    "adapters": ("several named adapters, merged or switched", "train one adapter per run (adapter: {type: lora})"),
}
MODEL_TYPES = {"ecd": "Ludwig's encoder-combiner-decoder models", "gbm": "gradient-boosted trees"}


def translate_ludwig(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (untouched) with Ludwig's spellings moved to affinage's; a ConfigError for what cannot be honoured."""
    raw = copy.deepcopy(raw)
    _top_level(raw)
    translate_prompt(raw)  # before the features: {__sample__} names the input column as Ludwig wrote it
    translate_features(raw)
    translate_decoder(raw)  # output_features[].decoder -> generation.constraint
    translate_adapter(raw)
    translate_quantization(raw)
    translate_model_parameters(raw)
    translate_generation(raw)
    translate_preprocessing(raw)
    translate_trainer(raw)
    return raw


def _top_level(raw: dict[str, Any]) -> None:
    model_type = str(raw.get("model_type", "llm")).lower()
    if model_type in MODEL_TYPES:
        raise refuse(
            f"model_type: {model_type}", MODEL_TYPES[model_type], "use model_type: llm (fine-tuning a language model)"
        )
    for key, (what, fix) in SECTIONS.items():
        if raw.get(key) not in (None, {}):
            raise refuse(key, what, fix)
        raw.pop(key, None)
    if raw.pop("is_multimodal", None) not in (None, False):
        raise refuse(
            "is_multimodal: true", "images next to the text prompt", "remove it: affinage fine-tunes text only"
        )
    _backend(raw.get("backend"))


def _backend(backend: Any) -> None:
    kind = str(backend.get("type", "local")).lower() if isinstance(backend, dict) else "local"
    if kind != "local":
        raise refuse(
            f"backend.type: {kind}",
            "distributed training on a Ray cluster" if kind == "ray" else "a distributed backend",
            "remove the backend block and launch data-parallel training with torchrun: "
            "`torchrun --nproc-per-node N -m affinage train CONFIG` (one process per GPU; see README)",
        )
