"""Ludwig's LLM config keys that affinage spells differently, or refuses by name (issue 16, in part).

A Ludwig user's config is read as Ludwig means it. A key affinage has under another name is
moved there (``adapter.init_lora_weights: pissa`` -> ``adapter.init: pissa``); a Ludwig key
affinage cannot honour is refused saying what it does and what to use instead, never as an
"unknown key". This runs on the raw mapping, before the schema validates it.
"""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError

# Ludwig key -> affinage key with the same meaning (moved when the affinage key is not also set).
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("preprocessing", "global_max_sequence_length"): ("trainer", "max_seq_len"),
    ("trainer", "enable_gradient_checkpointing"): ("trainer", "gradient_checkpointing"),
}

# adapter.init_lora_weights (PEFT's values) -> adapter.init; the others are refused below.
LORA_INIT = {True: "default", "default": "default", "true": "default", "gaussian": "gaussian", "pissa": "pissa"}
LORA_INIT_UNSUPPORTED = {
    False: "random B as well as A (the adapter changes the model before training)",
    "olora": "OLoRA's QR-based initialisation",
    "eva": "EVA's data-driven initialisation from activations",
    "corda": "CorDA's context-oriented decomposition",
    "loftq": "LoftQ's quantization-aware initialisation",
    "orthogonal": "orthogonal initialisation of A and B",
}

# generation keys of HF's GenerationConfig that affinage's decoding (greedy, temperature, top-p) lacks,
# with the value at which they change nothing (accepted and dropped).
GENERATION_NEUTRAL = {"top_k": (0, None, 50), "num_beams": (1, None), "repetition_penalty": (1, 1.0, None)}


def refuse(key: str, what: str, fix: str) -> ConfigError:
    return ConfigError(f"Ludwig's `{key}` ({what}) is not supported by affinage", where=key, fix=fix)


def translate_ludwig(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with Ludwig's spellings moved to affinage's; a ConfigError for what cannot be honoured."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    _move_renamed(raw)
    _adapter(raw.get("adapter"))
    _generation(raw.get("generation"))
    _backend(raw.get("backend"))
    _decoders(raw)
    return raw


def _move_renamed(raw: dict[str, Any]) -> None:
    for (section, key), (target_section, target_key) in RENAMED.items():
        block = raw.get(section)
        if not isinstance(block, dict) or key not in block:
            continue
        value = block.pop(key)
        target = raw.setdefault(target_section, {})
        if not isinstance(target, dict):
            continue
        if target.get(target_key, value) != value:
            raise ConfigError(
                f"`{section}.{key}` ({value}) and `{target_section}.{target_key}` ({target[target_key]}) disagree",
                where=f"{section}.{key}",
                fix=f"keep one of them (Ludwig's `{section}.{key}` is affinage's `{target_section}.{target_key}`)",
            )
        target[target_key] = value


def _adapter(adapter: Any) -> None:
    if not isinstance(adapter, dict):
        return
    if "init_lora_weights" in adapter:
        value = adapter.pop("init_lora_weights")
        key = value.lower() if isinstance(value, str) else value
        if key in LORA_INIT_UNSUPPORTED:
            raise refuse(
                f"adapter.init_lora_weights: {value}",
                LORA_INIT_UNSUPPORTED[key],
                "use adapter.init_lora_weights (or adapter.init) default, gaussian or pissa",
            )
        if key not in LORA_INIT:
            raise ConfigError(
                f"adapter.init_lora_weights: {value!r} is not one of PEFT's initialisations",
                where="adapter.init_lora_weights",
                fix="use default, gaussian or pissa",
            )
        adapter["init"] = LORA_INIT[key]
    bias = adapter.pop("bias_type", "none")
    if bias not in ("none", None):
        raise refuse(
            f"adapter.bias_type: {bias}",
            "training the layers' biases alongside LoRA",
            "remove it (bias_type: none): affinage trains the LoRA matrices only",
        )


def _generation(generation: Any) -> None:
    if not isinstance(generation, dict):
        return
    for key, neutral in GENERATION_NEUTRAL.items():
        if key in generation:
            value = generation.pop(key)
            if value not in neutral:
                raise refuse(
                    f"generation.{key}: {value}",
                    "a decoding strategy beyond greedy, temperature and top-p sampling",
                    f"remove generation.{key}; affinage decodes greedily (temperature 0) or samples with "
                    "temperature and top_p",
                )
    if "do_sample" in generation:
        sample = generation.pop("do_sample")
        if not sample:
            generation["temperature"] = 0.0  # HF: no sampling is greedy decoding, whatever the temperature
        elif not generation.get("temperature"):
            generation["temperature"] = 1.0  # HF's default temperature when sampling


def _backend(backend: Any) -> None:
    if isinstance(backend, dict) and str(backend.get("type", "local")).lower() == "ray":
        raise refuse(
            "backend.type: ray",
            "distributed training on a Ray cluster",
            "remove the backend block: affinage trains in one process on the machine it runs on",
        )


# Ludwig's output-feature decoder (issue 16): its constraint moves to generation.constraint.
DECODER_IGNORED = {"type", "tokenizer", "input_size", "pretrained_model_name_or_path", "vocab_file", "max_new_tokens"}


def _decoders(raw: dict[str, Any]) -> None:
    """``output_features[].decoder`` -> ``generation.constraint``: Ludwig's text_parser ``regex`` or
    ``json_schema`` (its examples), or text_extractor's ``match_strategy`` naming one of them."""
    features = raw.get("output_features")
    found: list[tuple[str, dict[str, Any]]] = []
    for number, feature in enumerate(features if isinstance(features, list) else []):
        if not isinstance(feature, dict) or not isinstance(feature.get("decoder"), dict):
            continue
        features[number] = feature = dict(feature)
        decoder, where = dict(feature.pop("decoder")), f"output_features.{number}.decoder"
        if decoder.get("type") == "category_extractor" or "grammar" in decoder:
            raise refuse(
                f"{where}.{'grammar' if 'grammar' in decoder else 'type: category_extractor'}",
                "an EBNF grammar" if "grammar" in decoder else "matching labels in a free generation",
                "use decoder.regex or decoder.json_schema (a category output feature is scored over its labels)",
            )
        strategy = decoder.pop("match_strategy", None)
        keys = {key: decoder.pop(key) for key in ("regex", "json_schema") if decoder.get(key) is not None}
        named = strategy if strategy in ("regex", "json_schema") else None
        if (
            strategy not in (None, "contains", named)
            or (named and named not in keys)
            or (strategy and not named and keys)
        ):
            raise ConfigError(
                f"decoder.match_strategy: {strategy} does not name the pattern given ({', '.join(keys) or 'none'})",
                where=f"{where}.match_strategy",
                fix="give the pattern under the key match_strategy names, e.g. match_strategy: regex, regex: '(a|b)'",
            )
        unknown = sorted(set(decoder) - DECODER_IGNORED)
        if unknown:
            raise ConfigError(
                f"unknown decoder key(s) {', '.join(unknown)}",
                where=where,
                fix="a text decoder takes regex or json_schema (and match_strategy naming it)",
            )
        if keys:
            found.append((where, keys))
    if len(found) > 1 or (found and len(found[0][1]) > 1):
        raise ConfigError(
            "more than one decoding constraint", where=found[0][0], fix="keep one regex or one json_schema"
        )
    if found:
        generation = raw.setdefault("generation", {})
        if not isinstance(generation, dict):
            return
        constraint = found[0][1]
        if generation.get("constraint") not in (None, constraint):
            raise ConfigError(
                f"{found[0][0]} and generation.constraint disagree",
                where=found[0][0],
                fix="keep one of them (Ludwig's decoder regex/json_schema is affinage's generation.constraint)",
            )
        generation["constraint"] = constraint
