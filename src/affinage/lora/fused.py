"""The LoRA update ``scaling * B(A(dropout(x)))`` with its own backward for ``A(dropout(x))``.

Why own the backward: written with stock ops, the update keeps for backward the dropout's
noise (a float per input element on CPU) *and* the dropped copy of the input (another float),
8 bytes per input element and layer. :class:`_MaskedProjection` keeps the input ``x`` itself (4 bytes, and
often already alive) and the dropout mask as bits (1/8 byte), recomputes the dropped input
in backward (one elementwise pass, cheap beside the matmuls), and never materialises ``B @ A``.
On SmolLM2-135M with LoRA on every projection that is about a third of the activation memory
of a training step. Gradients are the same as the stock ops given the same mask
(``tests/lora/test_fused.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from affinage.recompute import recipe_of

MASK_LEVELS = 65536  # the keep probability is drawn to 1/65536: 0.05 becomes 0.050003


def _dropped_levels(p: float) -> int:
    return round(p * MASK_LEVELS)


def dropout_rate(p: float) -> float:
    """The rate :func:`dropout_mask` actually draws (``p`` rounded to 1/65536)."""
    return _dropped_levels(p) / MASK_LEVELS


def keep_scale(p: float) -> float:
    """Inverted dropout's scale for the kept elements, from the drawn rate: unbiased."""
    return 1.0 / (1.0 - dropout_rate(p))


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of inverted dropout with rate ``p``, as booleans (1 byte per element).

    Why not ``bernoulli_``: CPU generators cost per value drawn (~6 ns), and a mask per layer
    input is millions of values per step (bernoulli took ~15 % of a step here). Drawing 64-bit
    words and reading each as four uniform 16-bit lanes draws 4x fewer values.
    """
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:count].view(x.shape)  # uniform over [-32768, 32767]
    return lanes >= _dropped_levels(p) - MASK_LEVELS // 2


_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` where ``keep``, +0.0 elsewhere (whatever ``x`` holds there: no NaN from 0 * inf).

    Why bits: the kept elements' bits ANDed with all ones, the others with zeros, in integers of
    ``x``'s width. ``torch.where`` runs a scalar loop on CPU: on 512 x 1536 it took 0.47 ms in fp32
    and 0.44 ms in bf16, the AND with the mask made wide 0.17 and 0.10 ms, and backward applies a
    mask twice per LoRA input."""
    return _masked(x, keep, in_place=False)


def masked_(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """:func:`masked` into ``x`` itself (a fresh tensor nobody else reads): no second tensor of its size."""
    return _masked(x, keep, in_place=True)


def _masked(x: torch.Tensor, keep: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    if keep is None:
        return x
    integer = _SAME_WIDTH_INT.get(x.dtype)
    if integer is None:
        return x.masked_fill_(~keep, 0.0) if in_place else torch.where(keep, x, 0.0)
    bits, mask = x.view(integer), keep.to(integer).neg_()
    return (bits.bitwise_and_(mask) if in_place else bits & mask).view(x.dtype)


def _int64(constant: int) -> int:
    """A 64-bit pattern as the signed value an int64 tensor holds."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


# Eight 0/1 bytes of a word to one byte and back, with one product each: integer tensors wrap
# around on overflow, so a product by a pattern of spaced bits gathers (or spreads) the bits.
GATHER = _int64(0x0102040810204080)
SPREAD, SELECT = _int64(0x0101010101010101), _int64(0x8040201008040201)
ROUND_UP, LOW_BITS = _int64(0x7F7F7F7F7F7F7F7F), _int64(0x0101010101010101)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits, eight to a byte: what backward keeps of a dropout mask.

    Why: one byte per element is 1/2 of a bf16 activation; a block's four LoRA inputs kept 3,264
    bytes per token on SmolLM2 (191 MiB at 2,048 tokens), bits keep 408. Four passes over the words
    (0.16 ms for a 2048 x 1536 mask here, 0.29 ms back, against 5 ms for one of the block's products)."""
    lanes = keep.reshape(-1).view(torch.uint8)
    if lanes.numel() % 8:
        lanes = torch.cat([lanes, lanes.new_zeros(-lanes.numel() % 8)])
    return ((lanes.view(torch.int64) * GATHER) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """:func:`pack_mask`'s mask back, as booleans of ``shape``: each bit spread to its own byte, and a
    byte that is not zero made 1 (adding 0x7F carries into the byte's top bit)."""
    spread = (packed.to(torch.int64) * SPREAD) & SELECT
    lanes = ((spread + ROUND_UP) >> 7) & LOW_BITS
    return lanes.view(torch.bool)[: math.prod(shape)].view(shape)


BLOCK_ELEMENTS = 1 << 20  # input elements per row block of a dropped projection (2 MiB in bf16)


def row_blocks(rows: int, width: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about :data:`BLOCK_ELEMENTS` elements, each a multiple of 8 rows (so
    of 8 elements: a block's mask packs to whole bytes, and draws whole 4-lane words)."""
    step = max(8, BLOCK_ELEMENTS // max(width, 1) // 8 * 8)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _MaskedProjection(torch.autograd.Function):
    """``(x * keep) @ A.T * scale`` keeping ``x`` and the mask's bits, not the masked copy, for backward.

    Full-size elementwise passes: one forward (mask), two backward (mask again); the dropout's
    1/(1-p) is applied on the rank-r side. An ``x`` declared :func:`~affinage.recompute.recomputable`
    is not kept: its sources are (its maker keeps them anyway), and backward recomputes it.

    ``keep=None`` with ``p > 0``: the mask is drawn here, block of rows by block (:func:`row_blocks`),
    the same values as :func:`dropout_mask` of the whole input. Why by blocks: the draw, the boolean
    mask and the masked copy of a whole long input are three temporaries of its size made between
    the tensors the forward keeps; freed, they leave holes the C heap cannot return (one
    2,048-token row of SmolLM2: ~200 MB of its peak). Blocks of a few MiB reuse the same few holes."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        keep: torch.Tensor | None,
        p: float,
        scale: float,
    ):
        hidden, packed = projected(x, weight, keep, p, scale)
        ctx.save_for_backward(weight, packed, *keep_for_backward(ctx, x))
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, packed, *kept = ctx.saved_tensors
        x, keep = kept_input(ctx, kept, packed)
        grad = grad * ctx.scale if ctx.scale != 1.0 else grad
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.t() @ masked(x, keep).reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_x = input_grad(rows, weight, keep, None).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None, None, None


def projected(
    x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, p: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scale * (x * keep) @ weight.T`` (no mask when ``keep`` is None and ``p == 0``) and the mask as bits."""
    if keep is None and p == 0:
        hidden, packed = F.linear(x, weight), None
    else:
        hidden, packed = dropped_product(x, weight, keep, p)
    return (hidden.mul_(scale) if scale != 1.0 else hidden), packed


def keep_for_backward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a node keeps to get ``x`` back in backward: ``x``, or the sources of a recomputable ``x``
    (its recipe then on ``ctx``; tensors go through save_for_backward, which checkpointing's hooks see)."""
    recipe = recipe_of(x)
    ctx.recompute = None if recipe is None else recipe.compute
    return (x,) if recipe is None else recipe.sources


def kept_input(ctx, kept: list[torch.Tensor], packed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`keep_for_backward`'s ``x`` back, and the dropout mask unpacked from its bits (or None)."""
    x = kept[0] if ctx.recompute is None else ctx.recompute(*kept)
    return x, (None if packed is None else unpack_mask(packed, x.shape))


def input_grad(
    rows: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, base: torch.Tensor | None
) -> torch.Tensor:
    """``keep * (rows @ A)``, added to the base layer's input gradient ``base`` (2-D) when given: without a
    mask it accumulates into it within the product (``addmm_``), no input-size temporary nor sum."""
    if base is not None and keep is None:
        return base.addmm_(rows, weight)
    grad = masked_(rows @ weight, None if keep is None else keep.reshape(rows.shape[0], -1))
    return grad if base is None else base.add_(grad)


def dropped_product(
    x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * keep) @ weight.T`` and the mask as bits, block of rows by block; ``keep=None``: drawn here."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    keep_rows = None if keep is None else keep.reshape(rows.shape)
    hidden = rows.new_empty(rows.shape[0], weight.shape[0])
    packed = torch.empty(-(-rows.numel() // 8), dtype=torch.uint8, device=x.device)
    for start, stop in row_blocks(rows.shape[0], width):
        block = rows[start:stop]
        mask = dropout_mask(block, p) if keep_rows is None else keep_rows[start:stop]
        packed[start * width // 8 : -(-stop * width // 8)] = pack_mask(mask)
        torch.mm(masked(block, mask), weight.t(), out=hidden[start:stop])
    return hidden.view(*x.shape[:-1], weight.shape[0]), packed


def compute_dtype(x: torch.Tensor, factor: torch.Tensor) -> torch.dtype:
    """The dtype the update runs in: the factors' (fp32) for an fp32 input, else the input's (bf16)."""
    return factor.dtype if x.dtype == torch.float32 else x.dtype


def masked_projection(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``A(dropout(x))`` with inverted dropout's scale, in :func:`compute_dtype`. ``keep``: the mask, or
    None to draw one here (``p > 0``) or for no dropout (``p == 0``)."""
    compute = compute_dtype(x, weight)
    return _MaskedProjection.apply(x.to(compute), weight.to(compute), keep, p, applied_scale(keep, p))


def applied_scale(keep: torch.Tensor | None, p: float) -> float:
    return keep_scale(p) if keep is not None or p > 0 else 1.0


def lora_update(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    keep: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """``scaling * (x * keep / (1-p)) @ A.T @ B.T``; ``keep=None``: a mask drawn here if ``p > 0``. Only
    ``x``, the mask's bits and the rank-r hidden are kept for backward (the factors are parameters)."""
    return rank_up(masked_projection(x, weight_a, keep, p), weight_b, scaling)


def rank_up(hidden: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B(hidden)``, LoRA's scaling applied on the rank-r side, in ``hidden``'s dtype."""
    return F.linear(hidden * scaling, weight_b.to(hidden.dtype))


def add_rank_up(result: torch.Tensor, hidden: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling * B(hidden)`` for rows (2-D ``result`` and ``hidden``).

    Into ``result`` itself when it is a fresh output (not a view, not a leaf) of ``hidden``'s dtype:
    one product accumulating into it (``addmm_``), no full-size temporary, one rounding. A base
    layer's output is kept by no backward (a linear's gradient needs its input and weight), so
    writing into it is safe. Else :func:`rank_up` added out of place."""
    if result.dtype == hidden.dtype and result._base is None and not (result.is_leaf and result.requires_grad):
        return result.addmm_(hidden, weight_b.to(hidden.dtype).t(), alpha=scaling)
    return result + rank_up(hidden, weight_b, scaling).to(result.dtype)
