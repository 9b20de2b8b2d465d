"""Ludwig's ``generation`` block: every key of HF's ``GenerationConfig`` that Ludwig's schema lists.

affinage decodes greedily (temperature 0) or samples with temperature and top-p. A key that
only changes beam search, sampling filters or token bans is accepted at the value where it
changes nothing (Ludwig's default), and refused by name at any other.
"""

from __future__ import annotations

from typing import Any

from affinage.ludwig.common import OFF, refuse

# Ludwig's default temperature (its generation schema, v0.10 and 0.17): sampling without one uses 0.1.
LUDWIG_TEMPERATURE = 0.1

FIX = (
    "remove generation.{key}: affinage decodes greedily (do_sample: false, temperature 0) or samples with "
    "temperature and top_p only"
)

# key -> (what it does, the values at which it changes nothing).
NEUTRAL: dict[str, tuple[str, tuple]] = {
    "min_new_tokens": ("a minimum number of generated tokens", (None, 0)),
    "min_length": ("a minimum total length", (None, 0)),
    "early_stopping": ("when beam search stops", (None, False, True, "never")),  # beam search only
    "max_time": ("a time limit on generation", (None,)),
    "num_beams": ("beam search", (None, 1)),
    "num_beam_groups": ("diverse beam search", (None, 1)),
    "penalty_alpha": ("contrastive search", (None, 0, 0.0)),
    "use_cache": ("reusing past keys and values (speed only)", (None, True, False)),
    "prompt_lookup_num_tokens": ("prompt-lookup speculative decoding", (None, 0)),
    "diversity_penalty": ("diverse beam search's penalty", (None, 0, 0.0)),
    "repetition_penalty": ("a repetition penalty", (None, 1, 1.0)),
    "encoder_repetition_penalty": ("an encoder repetition penalty", (None, 1, 1.0)),
    "length_penalty": ("beam search's length penalty", (None, 1, 1.0)),
    "no_repeat_ngram_size": ("banning repeated n-grams", (None, 0)),
    "bad_words_ids": ("banned token sequences", (None, [])),
    "force_words_ids": ("constrained beam search on forced words", (None, [])),
    "renormalize_logits": ("renormalising the logits after processors", (None, False)),
    "forced_bos_token_id": ("a forced first token", (None,)),
    "forced_eos_token_id": ("a forced last token", (None,)),
    "remove_invalid_values": ("removing NaN/inf logits", (None, False)),
    "exponential_decay_length_penalty": ("an exponential length penalty", (None,)),
    "suppress_tokens": ("suppressed tokens", (None, [])),
    "begin_suppress_tokens": ("tokens suppressed at the start", (None, [])),
    "forced_decoder_ids": ("forced tokens at given positions", (None, [])),
    "sequence_bias": ("a bias on token sequences", (None, {})),
    "guidance_scale": ("classifier-free guidance", (None, 1, 1.0)),
    "pad_token_id": ("a padding token other than the tokenizer's", (None,)),
    "bos_token_id": ("a start token other than the tokenizer's", (None,)),
    "eos_token_id": ("a stop token other than the tokenizer's", (None,)),
}
# Sampling filters: no effect with do_sample: false; otherwise (Ludwig samples by default) only their off value
# (top_k 50 is HF's and Ludwig's default: accepted, affinage does not cut to the top 50).
SAMPLING: dict[str, tuple[str, tuple]] = {
    "top_k": ("top-k sampling", (None, 0, 50)),
    "typical_p": ("locally typical sampling", (None, 1, 1.0)),
    "epsilon_cutoff": ("epsilon sampling", (None, 0, 0.0)),
    "eta_cutoff": ("eta sampling", (None, 0, 0.0)),
}


def translate_generation(raw: dict[str, Any]) -> None:
    """Map ``generation`` onto affinage's ``max_new_tokens``/``temperature``/``top_p``; refuse the rest by name."""
    generation = raw.get("generation")
    if not isinstance(generation, dict):
        return
    sample = generation.pop("do_sample", None)
    for key, (what, neutral) in NEUTRAL.items():
        if key in generation and generation[key] not in neutral:
            raise refuse(f"generation.{key}: {generation[key]}", what, FIX.format(key=key))
        generation.pop(key, None)
    for key, (what, neutral) in SAMPLING.items():
        value = generation.pop(key, None)
        if sample is not False and value not in neutral:  # Ludwig samples unless told not to
            raise refuse(f"generation.{key}: {value}", what, FIX.format(key=key))
    _length(generation)
    for key in ("temperature", "top_p"):
        if key in generation and generation[key] is None:
            generation.pop(key)  # Ludwig's null: the default
    if sample is False:
        generation["temperature"] = 0.0  # HF: no sampling is greedy decoding, whatever the temperature
    elif sample and not generation.get("temperature"):
        generation["temperature"] = LUDWIG_TEMPERATURE


def _length(generation: dict[str, Any]) -> None:
    """``max_length`` counts the prompt too; HF ignores it when ``max_new_tokens`` is set (Ludwig's default: 32)."""
    max_length = generation.pop("max_length", None)
    if "max_new_tokens" in generation and generation["max_new_tokens"] is None:
        generation.pop("max_new_tokens")
        if max_length not in OFF:
            raise refuse(
                f"generation.max_length: {max_length}",
                "a limit on prompt plus answer",
                "set generation.max_new_tokens (the answer's length) instead",
            )
