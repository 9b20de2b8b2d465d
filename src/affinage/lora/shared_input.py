"""One LoRA ``A`` product for the layers that read the same input tensor (q/k/v, gate/up).

Why: each layer's own ``x @ A.T`` is a matmul with 16 output columns, which CPUs and GPUs run
well below their rate, and with dropout each layer masks its input again in forward and twice in
backward. Stacking the ``A`` of the layers that read one tensor makes one product with 48 (or 32)
columns, one mask pass forward and two backward for the group, and one gradient for the input.
Each layer then applies its own ``B``. The values and gradients are those of separate layers
(``tests/lora/test_shared_input.py``); with dropout the layers must already share their mask
(:class:`~affinage.lora.layers.SharedDropout`), as they do by default.

Which layers read the same tensor is observed, not assumed from names: :func:`share_inputs` runs
one tiny forward and groups the layers whose input was the same tensor object. At run time a
group computes the stacked product when its first member sees a tensor, serves the other members
from it, and forgets it once every member has taken its share (a member called with another
tensor computes its own: a cross-attention's keys stay correct).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from affinage.lora.fused import masked_projection
from affinage.lora.fused_linear import lora_linears, plain_base


class InputGroup:
    """LoRA layers fed the same tensor: one stacked ``A`` product, each layer's slice of it; with plain bases
    (:func:`~affinage.lora.fused_linear.plain_base`), every layer's whole output from one node."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._source: weakref.ref | None = None
        self._served: tuple[torch.Tensor, ...] | None = None  # the stacked hidden, or every member's output
        self._waiting: set[int] = set()

    def hidden(self, member: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
        """``A(dropout(x))`` of ``member`` in the compute dtype (scaled by the dropout's 1/(1-p)), one mask
        drawn for the group (the members share their dropout module)."""

        def stacked() -> tuple[torch.Tensor, ...]:
            return (masked_projection(x, torch.cat([m.lora_A.weight for m in self.members]), None, p),)

        index = self._index(member)
        start = sum(m.r for m in self.members[:index])
        return self._serve(index, x, stacked)[0][..., start : start + member.r]

    def output(self, member: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor | None:
        """``member``'s output (base plus update) on ``x`` as rows, computed with every member's in one
        node; None when a member's base is not plain for ``x`` (then :meth:`hidden` serves it)."""
        if not all(plain_base(m, x) for m in self.members):
            return None
        index = self._index(member)
        return self._serve(index, x, lambda: lora_linears(x, self.members, None, p))[index]

    def _index(self, member: nn.Module) -> int:
        return next(i for i, m in enumerate(self.members) if m is member)

    def _serve(
        self, index: int, x: torch.Tensor, compute: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """What ``compute`` made for the group on ``x``: made when the first member asks, kept until every
        member has taken it (a member asking again, or with another tensor, starts over)."""
        if self._source is None or self._source() is not x or index not in self._waiting:
            self._served = compute()
            self._source, self._waiting = weakref.ref(x), set(range(len(self.members)))
        served = self._served
        self._waiting.discard(index)
        if not self._waiting:  # everyone served: keep no graph alive until the next forward
            self._source, self._served = None, None
        return served


def _groupable(module: nn.Module) -> bool:
    return hasattr(module, "input_group") and not module.use_dora and not module.merged


def _signature(module: nn.Module) -> tuple:
    """Layers stack only with the same input width, factor dtype and dropout mask (the very same module)."""
    dropout = module.lora_dropout
    mask = id(dropout) if getattr(dropout, "p", 0.0) > 0 else None
    return (module.in_features, module.lora_A.weight.dtype, mask)


def share_inputs(model: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> int:
    """Group the LoRA layers that read the same tensor (observed on one tiny forward); returns how many are grouped.

    ``probe``: the forward's keyword inputs (default: two token ids). A model whose forward
    cannot run on them keeps its layers ungrouped (nothing changes but speed).
    """
    layers = [m for m in model.modules() if _groupable(m)]
    for layer in layers:
        layer.input_group = None
    seen: dict[tuple, list[nn.Module]] = defaultdict(list)
    inputs: list[torch.Tensor] = []  # kept alive during the probe: an id is not reused

    def record(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0])
        seen[(id(args[0]), *_signature(module))].append(module)

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    device = next(model.parameters()).device
    training = model.training
    model.eval()  # no dropout draw: the run's random stream is the same with or without the probe
    try:
        with torch.no_grad():
            model(**(probe or {"input_ids": torch.tensor([[1, 2]], device=device)}))
    except Exception:  # noqa: BLE001 - an unusual forward only loses the speed-up
        return 0
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    grouped = 0
    for members in seen.values():
        if len(members) > 1 and len({id(m) for m in members}) == len(members):
            group = InputGroup(members)
            for member in members:
                member.input_group = group
            grouped += len(members)
    return grouped
