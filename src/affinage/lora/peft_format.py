"""Save and load adapters in PEFT's on-disk format.

``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained`` loads an
affinage adapter and affinage loads a PEFT one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from affinage.atomic import write_file_atomic
from affinage.errors import AffinageError
from affinage.lora.inject import inject_lora, lora_modules

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().to("cpu", torch.float32).contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().to("cpu", torch.float32).contiguous()
    return state


def peft_config(model: nn.Module, base_model_name: str, dropout: float) -> dict[str, Any]:
    modules = lora_modules(model)
    first = next(iter(modules.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": _adapted_layers(modules),
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _adapted_layers(modules: dict) -> list[int] | None:
    """PEFT's ``layers_to_transform``: None when every block is adapted."""
    from affinage.lora.inject import layer_index

    indices = sorted({i for i in (layer_index(name) for name in modules) if i is not None})
    return None if not indices or indices == list(range(indices[-1] + 1)) else indices


def save_adapter(model: nn.Module, directory: str | Path, base_model_name: str, dropout: float = 0.0) -> Path:
    """Write the adapter atomically: a killed run never leaves a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    write_file_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = json.dumps(peft_config(model, base_model_name, dropout), indent=2)
    write_file_atomic(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AffinageError(f"no {CONFIG_NAME} in {directory}", fix="point at a directory written by affinage or PEFT")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AffinageError(f"unsupported adapter type {config.get('peft_type')}", where=str(path))
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject LoRA as the adapter config says and load its weights (PEFT or affinage)."""
    config = read_adapter_config(directory)
    if not lora_modules(model):
        targets = config["target_modules"]
        inject_lora(model, targets if isinstance(targets, list) else "all-linear", r=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                    layers=config.get("layers_to_transform"))
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    modules = lora_modules(model)
    loaded = set()
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        module_name, _, factor = name.rpartition(".lora_")
        module = modules.get(module_name)
        if module is None:
            raise AffinageError(f"adapter weight {key} has no matching LoRA layer in the model", where=str(directory), fix="use the adapter with the base model it was trained on")
        target = module.lora_A if factor.startswith("A") else module.lora_B
        with torch.no_grad():
            target.weight.copy_(tensor.to(target.weight.dtype))
        loaded.add(module_name)
    missing = set(modules) - loaded
    if missing:
        raise AffinageError(f"adapter has no weights for {len(missing)} LoRA layers (e.g. {sorted(missing)[0]})", where=str(directory))
    return model
