"""``trainer.distributed: fsdp``: the model's weights sharded across the processes with FSDP2.

Each decoder block is its own ``fully_shard`` unit (its weights gathered for its forward and
backward, then freed), and the whole model the root unit (embeddings, final norm, head). FSDP2
arms its gathers in the root's ``forward``; affinage's losses call the decoder and the head
separately, so :func:`through_root` runs a loss *as* the root's forward for that call.

Gradients are summed, not averaged, across processes (the loss is already normalised by the
tokens of all processes), the frozen-prefix cache is off (it calls blocks outside the root), and
evaluation runs every example on every process: each forward gathers weights, a collective all
processes must join, so they cannot each take a different share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from affinage import distributed
from affinage.training.losses import LossFn
from affinage.training.prefix_cache import decoder_layers


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over every process of the run (an explicit device mesh: gloo CPU or NCCL GPU)."""
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    units = [*(decoder_layers(model) or []), model]
    for unit in units:
        fully_shard(unit, mesh=mesh)
        unit.set_gradient_divide_factor(1.0)  # a sum: the loss is normalised by the tokens of all processes
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM collectives: gloo has no AVG or PREMUL_SUM
    distributed.split_work(False)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def through_root(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` run as the sharded model's forward, so FSDP gathers the root's weights around it."""

    def sharded_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        model.forward = _bound(loss_fn, model)  # an instance attribute: the class's forward is back after
        try:
            return model(batch)
        finally:
            del model.forward

    return sharded_loss


def _bound(loss_fn: LossFn, model: nn.Module) -> Callable[[dict], tuple[torch.Tensor, int]]:
    return lambda batch: loss_fn(model, batch)
