"""Ludwig's ``adapter``, ``quantization`` and ``model_parameters`` blocks (PEFT's and bitsandbytes' keys)."""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError
from affinage.ludwig.common import block, drop_if_off, put, refuse

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
# Ludwig's adapter types other than lora (v0.10: adalora, ia3; 0.17 adds the rest).
OTHER_ADAPTERS = {
    "adalora": "AdaLoRA, LoRA whose ranks are pruned during training",
    "ia3": "IA3, learned scaling vectors on activations",
    "vera": "VeRA, shared random matrices with trained scaling vectors",
    "loha": "LoHa, a Hadamard product of low-rank matrices",
    "lokr": "LoKr, a Kronecker product of low-rank matrices",
    "fourierft": "FourierFT, trained spectral coefficients",
    "boft": "BOFT, butterfly orthogonal fine-tuning",
    "tinylora": "TinyLoRA",
    "c3a": "C3A, circular convolution adapters",
    "oft": "OFT, orthogonal fine-tuning",
    "hra": "HRA, Householder reflection adaptation",
    "waveft": "WaveFT, wavelet fine-tuning",
    "ln_tuning": "LN tuning, training the layer norms",
    "vblora": "VB-LoRA, a shared vector bank",
}
ADAPTER_FIX = "use adapter.type: lora (with r, alpha, dropout, target_modules; use_dora and use_rslora are supported)"
# LoRA keys that are off at these values and refused at any other.
LORA_OFF = {
    "loraplus_lr_ratio": "LoRA+, a larger learning rate for B than for A",
    "layer_replication": "replicating layers that share LoRA weights",
}


def translate_adapter(raw: dict[str, Any]) -> None:
    """Map Ludwig's LoRA keys onto affinage's ``adapter``; refuse other adapter types and what LoRA lacks."""
    if "adapter" in raw and raw["adapter"] is None:
        raise refuse(
            "adapter: null",
            "full fine-tuning of every weight of the base model",
            "add adapter: {type: lora}: affinage trains LoRA adapters only",
        )
    adapter = block(raw, "adapter")
    if adapter is None:
        return
    kind = str(adapter.get("type", "lora")).lower()
    if kind != "lora":
        what = OTHER_ADAPTERS.get(kind, "an adapter other than LoRA")
        raise refuse(f"adapter.type: {kind}", what, ADAPTER_FIX)
    _init(adapter)
    bias = adapter.pop("bias_type", "none")
    if bias not in ("none", None):
        raise refuse(
            f"adapter.bias_type: {bias}",
            "training the layers' biases alongside LoRA",
            "remove it (bias_type: none): affinage trains the LoRA matrices only",
        )
    if "r" in adapter and adapter.get("alpha") is None:
        adapter["alpha"] = 2 * adapter["r"]  # Ludwig: "alpha defaults to 2 * r"
    if "alpha" in adapter and adapter["alpha"] is None:
        adapter.pop("alpha")
    for key in ("target_modules", "rank_pattern", "alpha_pattern"):
        if key in adapter and adapter[key] is None:
            adapter.pop(key)  # Ludwig's null: affinage's default (all-linear; no per-module ranks)
    for key in ("eva_config", "loftq_config"):
        adapter.pop(key, None)  # settings of init_lora_weights eva / loftq, refused above: unused otherwise
    drop_if_off(adapter, "adapter", LORA_OFF, "remove it: affinage trains plain LoRA (DoRA and rsLoRA included)")
    _pretrained(adapter.pop("pretrained_adapter_weights", None))
    _postprocessor(adapter.pop("postprocessor", None))


def _init(adapter: dict[str, Any]) -> None:
    if "init_lora_weights" not in adapter:
        return
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


def _pretrained(path: Any) -> None:
    if path in (None, ""):
        return
    raise refuse(
        f"adapter.pretrained_adapter_weights: {path}",
        "starting from (or evaluating) an adapter trained elsewhere",
        "fold that adapter into its base first (PEFT's merge_and_unload, or `affinage merge RUN` for an affinage run) "
        "and set base_model to the merged directory",
    )


def _postprocessor(postprocessor: Any) -> None:
    if not isinstance(postprocessor, dict):
        return
    postprocessor.pop("progressbar", None)  # only how the merge reports progress
    if postprocessor.pop("merge_adapter_into_base_model", False):
        raise refuse(
            "adapter.postprocessor.merge_adapter_into_base_model: true",
            "saving the base model with the adapter folded in, after training",
            "remove it and run `affinage merge RUN --output DIR` on the run (or `affinage export RUN merged`)",
        )
    if postprocessor:
        raise refuse(f"adapter.postprocessor.{next(iter(postprocessor))}", "a postprocessing step", "remove it")


# quantization: Ludwig's bitsandbytes spellings -> affinage's.
QUANT_RENAMED = {
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_quant_type": "quant_type",
}


def translate_quantization(raw: dict[str, Any]) -> None:
    """``bnb_4bit_*`` -> affinage's names; ``llm_int8_*`` and torchao (0.17) only at bitsandbytes' defaults."""
    quantization = block(raw, "quantization")
    if quantization is None:
        return
    for ludwig_key, key in QUANT_RENAMED.items():
        if ludwig_key in quantization:
            put(raw, f"quantization.{key}", quantization.pop(ludwig_key), f"quantization.{ludwig_key}")
    fix = "remove it: affinage loads 8-bit weights with bitsandbytes' defaults (threshold 6.0, int8 weights)"
    drop_if_off(quantization, "quantization", {"llm_int8_has_fp16_weight": "keeping fp16 weights next to int8"}, fix)
    threshold = quantization.pop("llm_int8_threshold", 6.0)
    if threshold not in (None, 6, 6.0):
        raise refuse(f"quantization.llm_int8_threshold: {threshold}", "LLM.int8()'s outlier threshold", fix)
    backend = quantization.pop("backend", "bitsandbytes")
    if backend not in (None, "bitsandbytes"):
        raise refuse(
            f"quantization.backend: {backend}", "quantizing with torchao", "use backend: bitsandbytes (or remove it)"
        )
    drop_if_off(
        quantization,
        "quantization",
        {"mode": "torchao's quantization mode", "qat": "quantization-aware training"},
        "remove it: affinage trains LoRA on a bitsandbytes 4- or 8-bit base (QLoRA)",
    )


def translate_model_parameters(raw: dict[str, Any]) -> None:
    """``trust_remote_code`` moves to the top level; RoPE scaling and NEFTune are refused unless off."""
    parameters = raw.pop("model_parameters", None)
    if not isinstance(parameters, dict):
        return
    if "trust_remote_code" in parameters:
        put(raw, "trust_remote_code", parameters.pop("trust_remote_code"), "model_parameters.trust_remote_code")
    drop_if_off(
        parameters,
        "model_parameters",
        {
            "rope_scaling": "stretching the model's RoPE positions to a longer context",
            "neftune_noise_alpha": "NEFTune, noise added to the embeddings while training",
        },
        "remove it: affinage trains the model at its own context length, without embedding noise",
    )
    for key in parameters:
        raise refuse(f"model_parameters.{key}", "a model parameter override", "remove it")
