"""Many processes, one run: torchrun's environment, the process group, and the few collectives training needs.

affinage trains data-parallel on PyTorch's own engine: ``torchrun`` starts the processes and
``torch.distributed`` connects them (gloo on CPU, NCCL on CUDA). Everything here reads the
default process group, the way ``torch.distributed`` itself does, so a single process (no
group) runs every function as the identity and library code needs no ``if distributed``.

Why not the ``DistributedDataParallel`` wrapper: its gradient hooks are armed by the wrapped
module's ``forward``, but affinage's losses call the decoder and the vocabulary head separately
(the head only at labelled positions, the frozen-prefix cache starting above the frozen
blocks). The loop therefore reduces the LoRA gradients itself, once per optimizer step after
gradient accumulation (what DDP does under ``no_sync``), in one flat ``all_reduce``: LoRA's
gradients are small, one call is cheaper than DDP's buckets.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")
R = TypeVar("R")

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this has lost a peer


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process among several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_processes() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE): they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def init(device: torch.device) -> torch.device:
    """Join the run's process group when torchrun launched this process; the device this rank computes on.

    On CUDA each process takes the GPU of its local rank and the group uses NCCL; on the CPU, gloo.
    """
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend=backend, store=_attempt_store(world), rank=rank, world_size=world, timeout=TIMEOUT)
    atexit.register(close)
    return device


def _attempt_store(world: int) -> dist.Store | None:
    """The rendezvous store of this attempt, or None for torch's own ``env://`` rendezvous.

    Under ``torchrun --max-restarts`` the restarted workers meet again in the agent's store, which
    still holds the first attempt's gloo addresses (torch 2.13 no longer prefixes them per
    attempt): they would connect to dead peers and hang. A prefix per restart keeps attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=TIMEOUT
    )
    return dist.PrefixStore(f"affinage/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def close() -> None:
    """Leave the process group (a clean exit: torch warns about a group left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_split_work = True  # False while the model is sharded (FSDP): every process must run every forward


def split_work(enabled: bool) -> None:
    """Whether evaluation splits its examples across the processes (:func:`shard`, :func:`map_shards`).

    A sharded model gathers its weights in every forward, a collective all processes must join:
    then each runs all the examples (same inputs, same answers) instead of its share.
    """
    global _split_work
    _split_work = enabled


def splitting() -> bool:
    return active() and _split_work


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of ``items``: every ``world_size``-th from its rank (lengths stay balanced)."""
    return items[rank() :: world_size()] if splitting() else items


def sum_shares(*values: float) -> list[float]:
    """Per-share sums (of :func:`shard`'s shares) summed over the ranks: the sums over all items."""
    return sum_values(*values) if splitting() else list(values)


def unshard(shares: Sequence[Sequence[R]], total: int) -> list[R]:
    """The items of :func:`shard`'s shares (one per rank, in rank order) back in their original order."""
    merged: list[Any] = [None] * total
    for owner, share in enumerate(shares):
        merged[owner :: len(shares)] = list(share)
    return merged


def map_shards(fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)``, with the work split across ranks and every rank given the whole result, in order."""
    if not splitting():
        return list(fn(items))
    mine = shard(items)
    local = list(fn(mine)) if len(mine) else []
    shares: list[Any] = [None] * world_size()
    dist.all_gather_object(shares, local)
    return unshard(shares, len(items))


def sum_values(*values: float) -> list[float]:
    """Each value summed over the ranks (in float64, so token counts stay exact)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (all ranks then take the same branch)."""
    return bool(sum_values(float(flag))[0]) if active() else flag


def reduce_gradients(params: Sequence[torch.Tensor], *scalars: float) -> list[float]:
    """Sum the gradients of ``params`` and the ``scalars`` over the ranks, in one ``all_reduce``.

    A parameter without a gradient on this rank (its share of the batch was empty) counts as zeros
    and gets the summed gradient. The loss is normalised by the tokens of all ranks before
    backward, so the sum is the one-process gradient. A NaN on any rank reaches every rank: all
    skip that step together.
    """
    if not active():
        return list(scalars)
    params = [p for p in params if not isinstance(p, DTensor)]  # a sharded model's are reduced by FSDP already
    device = _collective_device()
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32) for p in params
    ]
    flat = torch.cat([*pieces, torch.tensor(scalars, dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        summed = flat[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
        p.grad = summed if p.grad is None else p.grad.copy_(summed)
        offset += p.numel()
    return flat[offset:].tolist()


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Rank 0's values into every rank's ``params`` (DDP does this when it wraps a model)."""
    if not active():
        return
    for p in params:
        with torch.no_grad():
            staged = p.detach().to(_collective_device()).contiguous()
            dist.broadcast(staged, src=0)
            p.copy_(staged.to(p.device))


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled between this run's own processes only)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (DTensor) tensor, gathered from every process (a collective); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``target`` is sharded (this process's piece, no communication), or as it is."""
    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    return full


def barrier() -> None:
    if active():
        dist.barrier()
