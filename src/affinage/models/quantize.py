"""Pre-quantized base models for QLoRA: quantize once, in a child process, then load small.

Loading a full-precision checkpoint with a bitsandbytes config reads every weight in full
precision before quantizing it, and the training process keeps that peak (measured on
SmolLM2-135M: 987 MB peak RSS for a 158 MB 4-bit model). So the first QLoRA run quantizes in a
child process and saves the 4-bit checkpoint (bitsandbytes serialization) under the cache;
every run then loads the 4-bit file directly (441 MB peak, identical logits).

    python -m affinage.models.quantize SOURCE_DIR TARGET_DIR '{"bits": 4, ...}' DTYPE DEVICE
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from affinage.atomic import atomic_directory
from affinage.cache import cache_dir
from affinage.errors import ModelNotFoundError


def bnb_config(quantization: Any, dtype: torch.dtype) -> Any:
    """QLoRA's NF4 (or 8-bit) base through bitsandbytes, which runs on CPU and CUDA."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelNotFoundError(
            "quantization needs bitsandbytes",
            fix="pip install 'affinage[qlora]' (bitsandbytes), or remove the quantization section",
        )
    compute = dtype if quantization.compute_dtype == "auto" else getattr(torch, quantization.compute_dtype)
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def quantized_checkpoint(source: Path, quantization: Any, dtype: torch.dtype, device: torch.device) -> Path:
    """The cached 4/8-bit checkpoint of ``source`` (made once, in a subprocess)."""
    settings = quantization.model_dump(mode="json")
    key = hashlib.sha256(
        json.dumps([str(Path(source).resolve()), settings, str(dtype), device.type], sort_keys=True).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "quantized" / f"{Path(source).name}-{settings['bits']}bit-{key}"
    if (target / "config.json").is_file():
        return target
    with atomic_directory(target) as tmp:
        command = [
            sys.executable,
            "-m",
            "affinage.models.quantize",
            str(source),
            str(tmp),
            json.dumps(settings),
            str(dtype).replace("torch.", ""),
            device.type,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
            raise ModelNotFoundError(
                f"quantizing {source} failed: {reason}",
                fix="check that bitsandbytes is installed (pip install 'affinage[qlora]')",
            )
    return target


def _quantize(source: str, target: str, settings: str, dtype: str, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from affinage.config import QuantizationConfig

    compute = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=compute,
        quantization_config=bnb_config(QuantizationConfig(**json.loads(settings)), compute),
        device_map={"": device} if device != "cpu" else None,
    )
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    (Path(target) / "affinage_source.json").write_text(
        json.dumps({"quantized_from": source, "settings": json.loads(settings)})
    )


if __name__ == "__main__":
    _quantize(*sys.argv[1:6])
