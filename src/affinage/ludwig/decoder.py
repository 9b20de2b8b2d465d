"""An output feature's ``decoder`` (Ludwig's structured output) -> ``generation.constraint``.

Ludwig's examples (``examples/llm_structured_output``) write ``decoder: {type: text_parser,
regex: ...}`` or ``json_schema: {...}``; its text_extractor schema names the strategy in
``match_strategy``. Both become one regex or JSON-schema constraint on generation; ``contains``
(Ludwig's after-the-fact parsing) constrains nothing; an EBNF grammar and the category extractor
are refused by name.
"""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError
from affinage.ludwig.common import refuse

# Ludwig internals of a decoder that say nothing about the answer: accepted and dropped.
DECODER_IGNORED = {"type", "tokenizer", "input_size", "pretrained_model_name_or_path", "vocab_file", "max_new_tokens"}


def translate_decoder(raw: dict[str, Any]) -> None:
    """``output_features[].decoder`` -> ``generation.constraint``: Ludwig's text_parser ``regex`` or
    ``json_schema`` (its examples), or text_extractor's ``match_strategy`` naming one of them."""
    features = raw.get("output_features")
    found: list[tuple[str, dict[str, Any]]] = []
    for number, feature in enumerate(features if isinstance(features, list) else []):
        if not isinstance(feature, dict) or not isinstance(feature.get("decoder"), dict):
            continue
        decoder, where = dict(feature.pop("decoder")), f"output_features[{number}].decoder"
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
