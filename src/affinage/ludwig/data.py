"""Ludwig's ``preprocessing`` block and its feature keys, onto affinage's ``data``, ``trainer`` and ``eval``.

The ``decoder`` of an output feature (``decoder.type``, ``match``, ``text_parser``...) is left
as it is here: it is translated by its own module.
"""

from __future__ import annotations

from typing import Any

from affinage.ludwig.common import OFF, put, refuse

# Ludwig's split when preprocessing.split gives a type without probabilities (both versions).
LUDWIG_SPLIT = [0.7, 0.1, 0.2]
SPLIT_FIX = (
    "use split type random (or stratify on the output column) with probabilities, or give data.train, data.valid "
    "and data.test files (`affinage data split` writes them)"
)
SPLIT_TYPES = {
    "fixed": "a split read from a column of the data",
    "hash": "a split by hashing a key column",
    "datetime": "a split by date, oldest rows in train",
}


def translate_preprocessing(raw: dict[str, Any]) -> None:
    """``split`` -> ``data.split.ratios``; ``global_max_sequence_length`` -> ``trainer.max_seq_len``."""
    preprocessing = raw.get("preprocessing")
    if not isinstance(preprocessing, dict):
        return
    if "global_max_sequence_length" in preprocessing:
        length = preprocessing.pop("global_max_sequence_length")
        if length is not None:
            put(raw, "trainer.max_seq_len", length, "preprocessing.global_max_sequence_length")
    for key in ("oversample_minority", "undersample_majority"):
        value = preprocessing.pop(key, None)
        if value not in OFF:
            raise refuse(
                f"preprocessing.{key}: {value}",
                "resampling the training rows to balance the classes",
                "remove it: affinage stratifies the split by label; balance the data file itself if you need to",
            )
    for key in ("sample_ratio", "sample_size"):
        if key in preprocessing and preprocessing[key] is None:
            preprocessing.pop(key)
    _split(raw, preprocessing.pop("split", None))
    unknown = [key for key in preprocessing if key not in ("sample_ratio", "sample_size")]
    if unknown:
        raise refuse(f"preprocessing.{unknown[0]}", "a preprocessing setting of Ludwig's", "remove it")


def _split(raw: dict[str, Any], split: Any) -> None:
    if not isinstance(split, dict):
        return
    kind = str(split.get("type", "random")).lower()
    if kind in SPLIT_TYPES:
        raise refuse(f"preprocessing.split.type: {kind}", SPLIT_TYPES[kind], SPLIT_FIX)
    if kind not in ("random", "stratify"):
        raise refuse(f"preprocessing.split.type: {kind}", "a split affinage does not know", SPLIT_FIX)
    if kind == "stratify":
        column = split.get("column")
        labels = _output_columns(raw)
        if column is not None and column not in labels:
            raise refuse(
                f"preprocessing.split.column: {column}",
                "stratifying on a column other than the output's",
                f"stratify on the output column ({', '.join(labels) or 'the label'}): affinage stratifies on it",
            )
    probabilities = split.get("probabilities") or LUDWIG_SPLIT
    put(raw, "data.split.ratios", list(probabilities), "preprocessing.split.probabilities")


def _output_columns(raw: dict[str, Any]) -> list[str]:
    features = raw.get("output_features")
    if not isinstance(features, list):
        return []
    return [str(f.get("column") or f.get("name")) for f in features if isinstance(f, dict)]


INPUT_TYPES = ("text",)
# Keys of Ludwig's (ECD) feature schema that an LLM feature carries without using them.
IGNORED_FEATURE_KEYS = (
    "proc_column",
    "tied",
    "active",
    "dependencies",
    "reduce_input",
    "reduce_dependencies",
    "input_size",
    "num_classes",
    "default_validation_metric",
    "top_k",
    "calibration",
)


def translate_features(raw: dict[str, Any]) -> None:
    """``column`` is the data column (affinage's ``name``); a category output's ``vocab`` is the label set."""
    for side in ("input_features", "output_features"):
        features = raw.get(side)
        if not isinstance(features, list):
            continue
        for index, feature in enumerate(features):
            if not isinstance(feature, dict):
                continue
            where = f"{side}[{index}]"
            column = feature.pop("column", None)
            if column is not None:
                feature["name"] = column  # Ludwig reads the data from `column` (defaulting to `name`)
            for key in IGNORED_FEATURE_KEYS:
                feature.pop(key, None)
            _loss(feature.pop("loss", None), where)
            if side == "input_features":
                _input(feature, where)
            else:
                _output(raw, feature, where)


def _loss(loss: Any, where: str) -> None:
    """The LLM is trained on next-token cross-entropy, as in Ludwig; another loss is refused."""
    kind = loss.get("type") if isinstance(loss, dict) else loss
    if kind not in (
        None,
        "next_token_softmax_cross_entropy",
        "softmax_cross_entropy",
        "sequence_softmax_cross_entropy",
    ):
        raise refuse(
            f"{where}.loss.type: {kind}",
            "another training loss",
            "remove it: affinage trains on next-token cross-entropy",
        )


def _input(feature: dict[str, Any], where: str) -> None:
    kind = str(feature.get("type", "text")).lower()
    if kind not in INPUT_TYPES:
        raise refuse(
            f"{where}.type: {kind}",
            f"a {kind} input to the LLM",
            "use a text input feature: affinage fine-tunes text-to-text",
        )
    encoder = feature.pop("encoder", None)
    if isinstance(encoder, dict) and encoder.get("type", "passthrough") != "passthrough":
        raise refuse(
            f"{where}.encoder.type: {encoder['type']}",
            "an encoder in front of the LLM",
            "remove it: the LLM reads the prompt text itself (Ludwig's passthrough)",
        )


def _output(raw: dict[str, Any], feature: dict[str, Any], where: str) -> None:
    """Category output: ``preprocessing.vocab`` -> ``eval.labels``; ``fallback_label`` has nothing to catch."""
    kind = str(feature.get("type", "text")).lower()
    if kind not in ("text", "category"):
        raise refuse(
            f"{where}.type: {kind}",
            f"a {kind} output read from the LLM's answer",
            "use a text or category output feature",
        )
    preprocessing = feature.get("preprocessing")
    if not isinstance(preprocessing, dict):
        return
    vocab = preprocessing.pop("vocab", None)
    if vocab:
        put(raw, "eval.labels", [str(label) for label in vocab], f"{where}.preprocessing.vocab")
    # Ludwig answers fallback_label when the generated text matches no label; affinage scores every label of
    # the label set (eval.method: score), so an answer is always one of them.
    fallback = preprocessing.pop("fallback_label", None)
    if fallback is not None and (raw.get("eval") or {}).get("method") == "generate":
        raise refuse(
            f"{where}.preprocessing.fallback_label: {fallback}",
            "the label given when the generated answer matches none",
            "use eval.method: score (every answer is one of the labels), or eval.abstain_threshold for an 'unsure'",
        )
