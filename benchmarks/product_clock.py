"""A clock around every matrix product a training step calls from Python, by kind, and the bound it sets.

Why: the fraction of the matmul ceiling a step reaches is capped by the rate its products run at
*in the step*, whatever the rest costs. Summing the products' own wall-clock gives that cap: were
every other operation (norms, activations, softmax, RoPE, masks, autograd, the optimizer, Python)
free, the step would take the products' time and no less. affinage's step calls every product of
the decoder from Python (its own autograd nodes: LoRA linears, attention, head), so a
``TorchFunctionMode`` sees them all; products run by stock autograd in C++ would not be seen, and
the report says how much of the expected decoder work was.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor
# products whose summed dimension is the last one of their first factor...
PLAIN = {torch.mm, Tensor.mm, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, F.linear}
# ...and those that add into a first argument, the factors coming after it
ACCUMULATING = {torch.addmm, Tensor.addmm, Tensor.addmm_, torch.baddbmm, Tensor.baddbmm, Tensor.baddbmm_}
KINDS = ("decoder linears", "attention", "head", "LoRA factors and the rest")


def storages(tensors: Iterable[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class ProductClock(TorchFunctionMode):
    """Within the mode (and while ``on``), each product's seconds and FLOPs are added to ``totals[kind]``.

    Kinds: a product reading one of ``decoder_weights`` (the frozen linears), one reading
    ``head_weights``, a batched (3-D) one (attention), and the others (LoRA's rank-r factors)."""

    def __init__(self, decoder_weights: Iterable[Tensor], head_weights: Iterable[Tensor]):
        super().__init__()
        self.decoder, self.head = storages(decoder_weights), storages(head_weights)
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [seconds, FLOPs]
        self.on = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.on or (func not in PLAIN and func not in ACCUMULATING):
            return func(*args, **kwargs)
        started = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - started
        factors = args[1:3] if func in ACCUMULATING else args[:2]
        total = self.totals[self.kind(factors, out)]
        total[0] += seconds
        total[1] += 2 * out.numel() * factors[0].shape[-1]
        return out

    def kind(self, factors: Iterable[Tensor], out: Tensor) -> str:
        read = storages(factors)
        if read & self.decoder:
            return KINDS[0]
        if read & self.head:
            return KINDS[2]
        return KINDS[1] if out.dim() == 3 else KINDS[3]


@contextlib.contextmanager
def in_backward(clock: ProductClock, nodes: Iterable[type[torch.autograd.Function]]) -> Iterator[None]:
    """Within the block, ``nodes``' backward runs inside ``clock`` too: the autograd engine calls it without
    the function modes active at forward."""

    def clocked(backward):
        def call(*args, **kwargs):
            active = clock in torch.overrides._get_current_function_mode_stack()
            with contextlib.nullcontext() if active else clock:
                return backward(*args, **kwargs)

        return staticmethod(call)

    originals = [(node, vars(node)["backward"]) for node in nodes]
    for node, backward in originals:
        node.backward = clocked(backward.__func__)
    try:
        yield
    finally:
        for node, backward in originals:
            node.backward = backward


def for_model(model: torch.nn.Module) -> ProductClock:
    """A clock that tells ``model``'s frozen decoder linears and its output head from the rest."""
    decoder = [m.weight for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    decoder = [w for w in decoder if not w.requires_grad]
    return ProductClock(decoder, [model.get_output_embeddings().weight])


def report(
    totals: dict[str, list[float]], steps: int, step_seconds: float, model_flops: float, ceiling: float,
    expected_decoder_flops: float,
) -> str:  # fmt: skip
    """Per kind: seconds per step, share of the step, rate and fraction of the ceiling; then the bound."""
    lines = [f"products per timed step ({steps} steps, {step_seconds:.3f} s each, a clock around each call):"]
    product_seconds = 0.0
    for kind in KINDS:
        if kind not in totals:
            continue
        seconds, flops = (value / steps for value in totals[kind])
        product_seconds += seconds
        lines.append(
            f"  {seconds * 1e3:8.0f} ms  {seconds / step_seconds:6.1%}  {flops / seconds / 1e12:6.3f} TFLOP/s "
            f"({flops / seconds / ceiling:6.1%} of the ceiling)  {kind}"
        )
    seen = totals.get(KINDS[0], [0.0, 0.0])[1] / steps / max(expected_decoder_flops, 1.0)
    lines.append(
        f"  products {product_seconds:.3f} s of the step ({product_seconds / step_seconds:.1%}); decoder linears "
        f"seen: {seen:.1%} of their model FLOPs. Were every other operation free, the step would reach "
        f"{model_flops / (product_seconds * ceiling):.1%} of the ceiling."
    )
    return "\n".join(lines)
