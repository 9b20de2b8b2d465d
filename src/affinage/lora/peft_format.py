"""Save and load adapters in PEFT's on-disk format.

``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``, ``lora_embedding_A``/``lora_embedding_B`` for
embeddings, ``lora_magnitude_vector`` for DoRA), so ``peft.PeftModel.from_pretrained`` loads an
affinage adapter and affinage loads a PEFT one. Per-module ranks and alphas are written as
PEFT's ``rank_pattern``/``alpha_pattern``; ``use_rslora``/``use_dora`` as PEFT's flags.

A PiSSA adapter is saved as a plain LoRA on the *original* base: its base weight is the residual
``W - s·B0·A0``, so ``W_res + s·B·A = W + s·[B, -B0]·[A; A0]``, a rank-2r LoRA (alpha doubled,
or times sqrt(2) with rsLoRA, so the scaling is unchanged). Loading that adapter back into the
PiSSA model it was saved from takes the first r rows/columns again.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from affinage import distributed
from affinage.atomic import write_file_atomic
from affinage.errors import AffinageError
from affinage.lora.embedding import LoRAEmbedding
from affinage.lora.inject import inject_lora, is_linear, layer_index, lora_modules, matches, pattern_value
from affinage.lora.layers import LoRALinear, lora_scaling

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT's key for each parameter (the adapter name "default" is not written, as PEFT does).
_KEYS = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "embedding_A": "lora_embedding_A",
    "embedding_B": "lora_embedding_B",
    "magnitude_vector": "lora_magnitude_vector",
}


def _tensors(module: LoRALinear | LoRAEmbedding) -> dict[str, torch.Tensor]:
    """The module's trainable tensors by kind (``A``, ``B``, ``embedding_A``, ``magnitude_vector``...)."""
    if isinstance(module, LoRAEmbedding):
        tensors = {"embedding_A": module.lora_embedding_A, "embedding_B": module.lora_embedding_B}
    else:
        tensors = {"A": module.lora_A.weight, "B": module.lora_B.weight}
    if module.lora_magnitude_vector is not None:
        tensors["magnitude_vector"] = module.lora_magnitude_vector
    return tensors


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy; a sharded (FSDP) tensor is gathered first, so every process must call this together."""
    return distributed.full_tensor(tensor.detach()).to("cpu", torch.float32).contiguous()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own parameter names (checkpoints; PiSSA not converted)."""
    return {
        f"{PREFIX}{name}.{_KEYS[kind]}": _cpu(tensor)
        for name, module in lora_modules(model).items()
        for kind, tensor in _tensors(module).items()
    }


def _saved_module(module: LoRALinear | LoRAEmbedding) -> dict[str, torch.Tensor]:
    """Tensors as written to disk: PiSSA becomes a rank-2r LoRA on the original base."""
    tensors = {kind: _cpu(tensor) for kind, tensor in _tensors(module).items()}
    if getattr(module, "pissa_A0", None) is not None:
        tensors["A"] = torch.cat([tensors["A"], _cpu(module.pissa_A0)], dim=0)
        tensors["B"] = torch.cat([tensors["B"], -_cpu(module.pissa_B0)], dim=1)
    return tensors


def _saved_rank(module: LoRALinear | LoRAEmbedding) -> tuple[int, float]:
    """Rank and alpha as written to disk (PiSSA's rank-2r form keeps the same scaling)."""
    if getattr(module, "pissa_A0", None) is None:
        return module.r, module.alpha
    return 2 * module.r, module.alpha * (math.sqrt(2) if module.use_rslora else 2)


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """PEFT pattern keys reproducing ``values``: a layer name (q_proj) where all its modules agree, else full names."""
    if all(v == default for v in values.values()):
        return {}
    by_leaf: dict[str, set] = {}
    for name, value in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    uniform = {leaf: next(iter(vals)) for leaf, vals in by_leaf.items() if len(vals) == 1}
    patterns = {
        re.escape(name): value
        for name, value in values.items()
        if value != default and name.rsplit(".", 1)[-1] not in uniform
    }
    patterns.update({leaf: value for leaf, value in uniform.items() if value != default})
    if all(pattern_value(patterns, name, default) == value for name, value in values.items()):
        return patterns
    return {re.escape(name): value for name, value in values.items() if value != default}


def peft_config(model: nn.Module, base_model_name: str, dropout: float) -> dict[str, Any]:
    modules = lora_modules(model)
    saved = {name: _saved_rank(module) for name, module in modules.items()}
    ranks = {name: r for name, (r, _) in saved.items()}
    alphas = {name: alpha for name, (_, alpha) in saved.items()}
    rank, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    flags = {(m.use_rslora, m.use_dora) for m in modules.values()}
    if len(flags) > 1:
        raise AffinageError(
            "the model's LoRA layers mix rsLoRA/DoRA settings, which PEFT's format cannot describe",
            fix="inject every layer with the same use_rslora/use_dora",
        )
    use_rslora, use_dora = flags.pop()
    inits = {m.init for m in modules.values() if isinstance(m, LoRALinear)}
    targets, layers = _targets(model, modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": "gaussian" if inits == {"gaussian"} else True,  # PiSSA is saved converted: plain LoRA
        "modules_to_save": None,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "layers_to_transform": layers,
        "rank_pattern": _patterns(ranks, rank),
        "alpha_pattern": _patterns(alphas, alpha),
    }


def _adapted_layers(modules: dict) -> list[int] | None:
    """PEFT's ``layers_to_transform``: None when every block is adapted (or a module is outside the blocks)."""
    indices = [layer_index(name) for name in modules]
    present = sorted({i for i in indices if i is not None})
    if None in indices or not present or present == list(range(present[-1] + 1)):
        return None
    return present


def _targets(model: nn.Module, modules: dict) -> tuple[list[str], list[int] | None]:
    """``target_modules``/``layers_to_transform`` that make PEFT adapt exactly these modules.

    Layer names (``q_proj``) when they select exactly the adapted set, else the full names.
    """
    leaves, layers = sorted({name.rsplit(".", 1)[-1] for name in modules}), _adapted_layers(modules)
    inside = tuple(f"{name}." for name in modules)
    selected = {
        name
        for name, module in model.named_modules()
        if not name.startswith(inside)
        and (is_linear(module) or isinstance(module, nn.Embedding) or name in modules)
        and matches(name, leaves)
        and (layers is None or layer_index(name) in layers)
    }
    return (leaves, layers) if selected == set(modules) else (sorted(modules), None)


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as PEFT names them on disk (PiSSA converted). With a sharded model (FSDP) every
    process must call this together: each tensor is gathered."""
    return {
        f"{PREFIX}{name}.{_KEYS[kind]}": tensor
        for name, module in lora_modules(model).items()
        for kind, tensor in _saved_module(module).items()
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name: str, dropout: float = 0.0) -> Path:
    """Write the adapter atomically: a killed run never leaves a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = peft_state(model)
    config = json.dumps(peft_config(model, base_model_name, dropout), indent=2)
    write_file_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
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


_CONVERT = "convert it with PEFT first: merge_and_unload() and use the merged model as base_model"
# option -> (is the value supported?, fix)
_OPTIONS = {
    "bias": (lambda v: v in (None, "none"), "retrain with bias='none', or " + _CONVERT),
    "lora_bias": (lambda v: not v, "retrain with lora_bias=False, or " + _CONVERT),
    "modules_to_save": (lambda v: not v, "retrain without modules_to_save, or " + _CONVERT),
    "fan_in_fan_out": (lambda v: not v, _CONVERT),
    "init_lora_weights": (
        lambda v: v in (True, False, "gaussian", "pissa"),
        "re-save it as a plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), or "
        + _CONVERT,
    ),
    "trainable_token_indices": (lambda v: not v, _CONVERT),
    "layer_replication": (lambda v: not v, _CONVERT),
    "use_qalora": (lambda v: not v, _CONVERT),
    "target_parameters": (lambda v: not v, _CONVERT),
    "alora_invocation_tokens": (lambda v: not v, _CONVERT),
    "ensure_weight_tying": (lambda v: not v, "retrain with ensure_weight_tying=False, or " + _CONVERT),
    "megatron_config": (lambda v: not v, _CONVERT),
    "arrow_config": (lambda v: not v, _CONVERT),
    "use_bdlora": (lambda v: not v, _CONVERT),
}


def check_options(config: dict[str, Any], path: Path) -> None:
    """Refuse, naming the option and the fix, what affinage's LoRA layers cannot reproduce exactly."""
    for option, (supported, fix) in _OPTIONS.items():
        if option in config and not supported(config[option]):
            raise AffinageError(f"unsupported adapter option {option}={config[option]!r}", where=str(path), fix=fix)
    if config.get("target_modules") is None:
        raise AffinageError(
            "adapter config names no target_modules",
            where=str(path),
            fix="use a LoRA adapter saved by PEFT or affinage",
        )


def _read_state(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module: {kind: tensor}}`` for the LoRA tensors, and any base weights (PEFT's save_embedding_layers)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AffinageError(
            f"no {WEIGHTS_NAME} in {directory}", fix="point at a directory written by affinage or PEFT (safetensors)"
        )
    lora: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(path)).items():
        name = key.removeprefix(PREFIX)
        module_name, found, rest = name.rpartition(".lora_")
        if not found:
            base[name] = tensor
            continue
        kind, *tail = rest.split(".")
        if kind not in _KEYS or any(part not in ("default", "weight") for part in tail):
            raise AffinageError(
                f"unknown adapter weight {key}",
                where=str(path),
                fix="use a plain LoRA/DoRA adapter saved by PEFT or affinage",
            )
        lora.setdefault(module_name, {})[kind] = tensor
    return lora, base


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject LoRA as the adapter config says and load its weights (PEFT or affinage).

    Into a model that already has LoRA layers (the one being trained), only the weights are
    loaded, after checking each layer's shape and scaling agree with the adapter.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    check_options(config, directory / CONFIG_NAME)
    lora, base = _read_state(directory)
    if not lora_modules(model):
        layers = config.get("layers_to_transform")  # PEFT: an int is one block's index (affinage: the last N blocks)
        inject_lora(
            model,
            config["target_modules"],
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=0.0,
            layers=[layers] if isinstance(layers, int) else layers or None,
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
            init="pissa" if config.get("init_lora_weights") == "pissa" else "default",
            rank_pattern=config.get("rank_pattern"),
            alpha_pattern=config.get("alpha_pattern"),
            exclude=config.get("exclude_modules"),
        )
    modules = lora_modules(model)
    where = str(directory)
    for name, tensors in lora.items():
        module = modules.get(name)
        if module is None:
            raise AffinageError(
                f"adapter weights for {name} have no matching LoRA layer in the model",
                where=where,
                fix="use the adapter with the base model it was trained on",
            )
        expected = lora_scaling(
            int(pattern_value(config.get("rank_pattern"), name, config["r"])),
            pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]),
            bool(config.get("use_rslora")),
        )
        if not math.isclose(expected, module.scaling, rel_tol=1e-6):
            raise AffinageError(
                f"{name}: the adapter's scaling {expected:g} differs from the model's LoRA layer ({module.scaling:g})",
                where=where,
                fix="load the adapter into a fresh base model",
            )
        _load_module(module, name, tensors, where)
    missing = sorted(set(modules) - set(lora))
    if missing:
        raise AffinageError(f"adapter has no weights for {len(missing)} LoRA layers (e.g. {missing[0]})", where=where)
    _check_base_weights(model, base, where)
    return model


def _load_module(module: LoRALinear | LoRAEmbedding, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    targets = _tensors(module)
    for kind, tensor in tensors.items():
        target = targets.get(kind)
        if target is None:
            what = "DoRA magnitude" if kind == "magnitude_vector" else f"lora_{kind}"
            raise AffinageError(
                f"adapter has a {what} for {name}, which the model's LoRA layer ({type(module).__name__}) lacks",
                where=where,
                fix="load the adapter into a fresh base model",
            )
        if tensor.shape != target.shape:
            tensor = _pissa_part(module, kind, tensor)
            if tensor is None:
                raise AffinageError(
                    f"{name}.lora_{kind}: shape {tuple(tensors[kind].shape)} "
                    f"but the layer expects {tuple(target.shape)}",
                    where=where,
                    fix="use the adapter with the base model (and rank) it was trained with",
                )
        with torch.no_grad():  # a sharded target takes its own piece of the tensor
            target.copy_(distributed.like(tensor.to(device=target.device, dtype=target.dtype), target))
    absent = set(targets) - set(tensors)
    if absent:
        raise AffinageError(
            f"adapter has no {', '.join(sorted('lora_' + k for k in absent))} for {name}",
            where=where,
            fix="use an adapter saved with the same options (use_dora)",
        )


def _pissa_part(module: LoRALinear | LoRAEmbedding, kind: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """A saved (converted) rank-2r PiSSA factor loaded back into its PiSSA layer: its first r rows/columns."""
    initial = getattr(module, "pissa_A0" if kind == "A" else "pissa_B0", None)
    if initial is None or kind not in ("A", "B"):
        return None
    r = module.r
    head, tail = (tensor[:r], tensor[r:]) if kind == "A" else (tensor[:, :r], -tensor[:, r:])
    if tail.shape != initial.shape or not torch.allclose(tail.float(), initial.float().cpu(), rtol=1e-4, atol=1e-6):
        return None
    return head


def _check_base_weights(model: nn.Module, base: dict[str, torch.Tensor], where: str) -> None:
    """PEFT also saves the base table/head when they are targeted: accept them when they are the model's own."""
    for key, tensor in base.items():
        node: Any = model
        for part in key.split("."):
            node = getattr(node, part, None)
        if (
            not isinstance(node, torch.Tensor)
            or node.shape != tensor.shape
            or not torch.allclose(tensor.to(node.dtype).float(), node.detach().float().cpu(), rtol=1e-3, atol=1e-5)
        ):
            raise AffinageError(
                f"adapter carries its own base weight {key}, which differs from this model's "
                "(e.g. a resized vocabulary or modules_to_save)",
                where=where,
                fix=_CONVERT,
            )
