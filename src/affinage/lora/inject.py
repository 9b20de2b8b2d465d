"""Put LoRA into a transformers model by module name, and take it out again.

Nothing here knows an architecture: targets are matched by the last component of a module's
name (``q_proj``, ``down_proj``, ``gate_up_proj``...) or, with ``all-linear``, every linear
layer except the output head, so Llama, Gemma, Phi or Qwen models go through the same code.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from affinage.errors import ConfigError
from affinage.lora.layers import LoRALinear


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; keep a name check for safety.
    return type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module belongs to (``model.layers.7.mlp`` -> 7)."""
    match = _LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) if match else None


def num_layers(model: nn.Module) -> int:
    indices = [layer_index(name) for name, _ in model.named_modules()]
    return max((i for i in indices if i is not None), default=-1) + 1


def resolve_layers(model: nn.Module, layers: int | list[int] | None) -> list[int] | None:
    """``None``: every block; an int N: the last N blocks; a list: those indices."""
    if layers is None:
        return None
    if isinstance(layers, int):
        total = num_layers(model)
        return list(range(max(0, total - layers), total))
    return sorted(layers)


def find_targets(model: nn.Module, target_modules: Iterable[str] | str, layers: list[int] | None = None) -> list[str]:
    """Full names of the linear modules to adapt (only in blocks ``layers`` when given)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or isinstance(module, LoRALinear) or module is head:
            continue
        if ".lora_A" in name or ".lora_B" in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if layers is not None and layer_index(name) not in layers:
            continue
        if target_modules == "all-linear" or leaf in target_modules or name in target_modules:
            names.append(name)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m) and m is not head})
        raise ConfigError(
            f"adapter.target_modules {target_modules!r} matches no linear layer of this model",
            where="adapter.target_modules",
            fix=f"use 'all-linear' or some of: {', '.join(available)}",
        )
    return names


def inject_lora(model: nn.Module, target_modules: Iterable[str] | str, r: int, alpha: float, dropout: float, layers: int | list[int] | None = None) -> list[str]:
    """Replace each target linear layer by a :class:`LoRALinear` around it; returns their names.

    Adapting only the upper blocks (``layers``) is also a speed knob: autograd then stops the
    backward pass at the lowest adapted block.
    """
    names = find_targets(model, target_modules, resolve_layers(model, layers))
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear.from_base(getattr(parent, leaf), r=r, alpha=alpha, dropout=dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def fuse_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and drop the wrappers (for export)."""
    for name, module in list(lora_modules(model).items()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module.fuse())
    return model
