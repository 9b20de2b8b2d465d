"""Resume checkpoints: numbered directories, each everything a killed run needs to go on exactly.

Layout, one directory per checkpoint (``keep`` of them are kept)::

    checkpoint/step-000120/
        adapter.safetensors    the LoRA factors (PEFT names)
        optimizer.safetensors  AdamW's moments and step counts, the torch CPU/CUDA RNG states of each process
        state.json             counters, data cursor, best validation, metrics, optimizer groups, python/numpy RNG
        COMPLETE               written last: a directory without it is never read

A checkpoint is first one plain dict (:func:`capture`, nanoGPT's shape), then files. Under
torchrun every process takes part in :func:`capture` (the RNG states of all are gathered: each
draws its own dropout masks) and rank 0 alone writes; the adapter and optimizer are the same on all. The
directory is written under a temporary name, every file synced, then renamed, so a kill or a full
disk while writing leaves the previous checkpoint whole. Only safetensors and JSON are read back:
loading a checkpoint runs no pickled code.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from affinage import distributed
from affinage.atomic import atomic_directory
from affinage.errors import AffinageError
from affinage.lora.peft_format import adapter_state
from affinage.training.state import TrainState

FORMAT = 2  # 2: one RNG state per process
MARKER = "COMPLETE"
NAME = re.compile(r"step-(\d+)")

Checkpoint = dict[str, Any]


def capture(state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, cursor: dict) -> Checkpoint:
    """The whole checkpoint as one explicit dict. The schedule is a pure function of ``state.step``,
    so the step is the scheduler's position; ``cursor`` is where the batch stream stands."""
    return {
        "format": FORMAT,
        "state": state.to_dict(),  # step, counters, best validation, non-finite counts, metrics so far
        "cursor": cursor,  # {"epoch", "position", "batches"}
        "adapter": adapter_state(model),
        "optimizer": _whole(optimizer.state_dict()),
        "rng": distributed.gather(rng_states()),  # one per process, in rank order
    }


def _whole(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """AdamW's state with a sharded model's (FSDP) moments gathered whole: a checkpoint independent of the sharding."""
    moments = {
        index: {k: distributed.full_tensor(v) for k, v in values.items()}
        for index, values in optimizer_state["state"].items()
    }
    return {**optimizer_state, "state": moments}


def rng_states() -> dict[str, Any]:
    """Every random generator a step may draw from: torch CPU (dropout), CUDA, python, numpy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_states(rng: dict[str, Any]) -> None:
    """Put the generators back as :func:`rng_states` found them (CUDA only on the same device count)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load the adapter, optimizer and RNG states into the live objects; the run's :class:`TrainState`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in checkpoint["adapter"].items():
            target = params[key.removeprefix("base_model.model.")]
            target.copy_(distributed.like(tensor, target))  # a sharded parameter takes its own piece
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # a sharded model's moments cut like their parameters
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    moments[key] = distributed.like(value, param)
    rngs = checkpoint["rng"]  # on another number of processes, the states are dealt round
    set_rng_states(rngs[distributed.rank() % len(rngs)])
    state = TrainState.from_dict(checkpoint["state"])
    state.batches = checkpoint["cursor"]["batches"]
    return state


# --- on disk -----------------------------------------------------------------------------------


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's name says, or None for anything else."""
    match = NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first; half-written ones are not listed."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint: what a restart continues from."""
    found = complete(root)
    return found[-1] if found else None


def save(checkpoint: Checkpoint, root: Path, keep: int = 2) -> Path:
    """Write ``checkpoint`` as ``root/step-NNNNNN`` atomically, then delete all but the newest ``keep``.

    A full disk raises an :class:`AffinageError` that names the checkpoint left intact.
    """
    target = root / f"step-{checkpoint['state']['step']:06d}"
    try:
        with atomic_directory(target) as tmp:
            _write_files(checkpoint, tmp)
            (tmp / MARKER).write_text(f"{checkpoint['state']['step']}\n")  # last: the directory is whole
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _disk_full(target, latest(root)) from None
        raise
    prune(root, keep)
    return target


def _disk_full(target: Path, previous: Path | None) -> AffinageError:
    kept = (
        f"the previous checkpoint {previous} is intact"
        if previous
        else "no earlier checkpoint exists; nothing resumable"
    )
    return AffinageError(
        f"no space left on the device while writing checkpoint {target}: it was not written, {kept}",
        fix="free disk space (or lower trainer.keep_checkpoints), then run the same command again to resume"
        + (f" from step {step_of(previous)}" if previous else ""),
    )


def prune(root: Path, keep: int) -> None:
    """Delete older complete checkpoints beyond ``keep`` and leftovers of interrupted writes."""
    found = complete(root)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    newest = step_of(found[-1]) if found else -1
    for path in root.iterdir():
        half_written = step_of(path) is not None and not (path / MARKER).is_file() and step_of(path) < newest
        if path.name.startswith(".step-") or half_written:
            shutil.rmtree(path, ignore_errors=True)


def _write_files(checkpoint: Checkpoint, directory: Path) -> None:
    """The dict as files: tensors to safetensors, everything else to JSON."""
    optimizer = checkpoint["optimizer"]
    tensors, scalars = {}, {}
    for index, values in optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    python_rngs = []
    for rank, rng in enumerate(checkpoint["rng"]):
        tensors[f"rng.{rank}.torch"] = rng["torch"]
        tensors.update({f"rng.{rank}.cuda.{i}": state for i, state in enumerate(rng["cuda"])})
        numpy_name, keys, *numpy_rest = rng["numpy"]
        python_rngs.append({"python": rng["python"], "numpy": [numpy_name, np.asarray(keys).tolist(), *numpy_rest]})
    save_file(checkpoint["adapter"], directory / "adapter.safetensors")
    save_file(tensors, directory / "optimizer.safetensors")
    meta = {
        "format": checkpoint["format"],
        "state": checkpoint["state"],
        "cursor": checkpoint["cursor"],
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
        "rng": python_rngs,
    }
    (directory / "state.json").write_text(json.dumps(meta, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    """numpy scalars in the RNG state as JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint")


def load(path: Path) -> Checkpoint:
    """A checkpoint directory back as the dict :func:`capture` made (refuses one without its marker)."""
    if not (path / MARKER).is_file():
        raise AffinageError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise AffinageError(
            f"{path} was written by another version of affinage (checkpoint format {meta.get('format')}, "
            f"this one reads {FORMAT})",
            fix="finish the run with the version that started it, or pass --overwrite to train again from the start",
        )
    tensors = load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {
        "format": meta["format"],
        "state": meta["state"],
        "cursor": meta["cursor"],
        "adapter": load_file(path / "adapter.safetensors"),
        "optimizer": {"state": state, "param_groups": meta["optimizer"]["param_groups"]},
        "rng": [_rng_of(rank, tensors, python) for rank, python in enumerate(meta["rng"])],
    }


def _rng_of(rank: int, tensors: dict[str, torch.Tensor], python: dict[str, Any]) -> dict[str, Any]:
    """One process's RNG states from the checkpoint's tensors and JSON."""
    cuda = sorted((k for k in tensors if k.startswith(f"rng.{rank}.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    return {"torch": tensors[f"rng.{rank}.torch"], "cuda": [tensors[k] for k in cuda], **python}
