"""Put LoRA into a transformers model by module name, and take it out again.

Nothing here knows an architecture: targets are matched like PEFT matches them (a module whose
name is, or ends with ``.<key>``: ``q_proj``, ``down_proj``, ``embed_tokens``, ``lm_head``...;
a string other than ``all-linear`` is a regex on the full name) or, with ``all-linear``, every
linear layer except the output head, so Llama, Gemma, Phi or Qwen models go through the same
code. Embedding tables and the output head are adapted only when named.

Tied embeddings (the head sharing the input table's weight) stay correct: the wrappers never
write to a base weight, and when fusing (or PiSSA) gives one side a new weight, the model's
config is untied so that saving writes both and loading does not tie them again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

from affinage.errors import ConfigError
from affinage.lora.embedding import LoRAEmbedding
from affinage.lora.layers import INITS, LoRALinear

WRAPPERS = (LoRALinear, LoRAEmbedding)


def is_linear(module: nn.Module) -> bool:
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


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key ``k`` with ``(.*\\.)?k$`` matching ``name``."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def pattern_value(patterns: Mapping[str, float] | None, name: str, default: float) -> float:
    key = pattern_key(patterns or {}, name)
    return default if key is None else patterns[key]


def matches(name: str, keys: Iterable[str] | str) -> bool:
    """PEFT's target/exclude matching: a string is a regex on the full name, a list of names or suffixes."""
    if isinstance(keys, str):
        return re.fullmatch(keys, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in keys)


def find_targets(
    model: nn.Module,
    target_modules: Iterable[str] | str,
    layers: list[int] | None = None,
    exclude: Iterable[str] | str | None = None,
) -> list[str]:
    """Full names of the modules to adapt (only in blocks ``layers`` when given)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, WRAPPERS))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, WRAPPERS) or (inside and name.startswith(inside)):
            continue
        if not (is_linear(module) or isinstance(module, nn.Embedding)):
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        if exclude and matches(name, exclude):
            continue
        if target_modules == "all-linear":
            if is_linear(module) and module is not head:
                names.append(name)
        elif matches(name, target_modules):
            names.append(name)
    if not names:
        available = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if (is_linear(m) or isinstance(m, nn.Embedding)) and not (inside and n.startswith(inside))
            }
        )
        raise ConfigError(
            f"adapter.target_modules {target_modules!r} matches no linear or embedding layer of this model",
            where="adapter.target_modules",
            fix=f"use 'all-linear' or some of: {', '.join(available)}",
        )
    return names


def inject_lora(
    model: nn.Module,
    target_modules: Iterable[str] | str,
    r: int,
    alpha: float,
    dropout: float,
    layers: int | list[int] | None = None,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "default",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    exclude: Iterable[str] | str | None = None,
) -> list[str]:
    """Wrap each target layer in a :class:`LoRALinear` (embeddings: :class:`LoRAEmbedding`); returns their names.

    ``rank_pattern``/``alpha_pattern`` override ``r``/``alpha`` per module with PEFT's semantics.
    Adapting only the upper blocks (``layers``) is also a speed knob: autograd then stops the
    backward pass at the lowest adapted block.
    """
    if init not in INITS:
        raise ConfigError(f"unknown LoRA init {init!r}", where="adapter.init", fix=f"use one of: {', '.join(INITS)}")
    names = find_targets(model, target_modules, resolve_layers(model, layers), exclude)
    tied = embeddings_tied(model)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        wrapper = LoRAEmbedding if isinstance(base, nn.Embedding) else LoRALinear
        rank, scale = int(pattern_value(rank_pattern, name, r)), pattern_value(alpha_pattern, name, alpha)
        setattr(parent, leaf, wrapper(base, rank, scale, dropout, use_rslora=use_rslora, use_dora=use_dora, init=init))
    if tied and not embeddings_tied(model):  # PiSSA gave the head its own (residual) weight
        untie_config(model)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {name: module for name, module in model.named_modules() if isinstance(module, WRAPPERS)}


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the output head and the input table share one weight tensor right now."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return False
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or head is None:
        return False
    return getattr(inputs, "weight", None) is not None and inputs.weight is getattr(head, "weight", None)


def untie_config(model: nn.Module) -> None:
    """Tell transformers the head and the input table are separate weights now (save both, never re-tie)."""
    config = getattr(model, "config", None)
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for item in configs:
        if getattr(item, "tie_word_embeddings", False):
            item.tie_word_embeddings = False
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_keys, dict):
        model.all_tied_weights_keys = {k: v for k, v in tied_keys.items() if _same_tensor(model, k, v)}


def _same_tensor(model: nn.Module, first: str, second: str) -> bool:
    def resolve(dotted: str):
        node = model
        for part in dotted.split("."):
            node = getattr(node, part, None)
        return node

    return resolve(first) is not None and resolve(first) is resolve(second)


def fuse_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and drop the wrappers (for export).

    A fused table or head gets a new weight, so a tied pair is untied (config and weights).
    """
    tied = embeddings_tied(model)
    for name, module in list(lora_modules(model).items()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module.fuse())
    if tied and not embeddings_tied(model):
        untie_config(model)
    return model
