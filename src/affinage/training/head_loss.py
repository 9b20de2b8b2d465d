"""The vocabulary head and the cross-entropy at labelled positions, in vocabulary chunks, gradient included.

Why: at labelled positions only (``losses.causal_lm_loss``) the head multiplies a few rows by the
whole vocabulary matrix (SmolLM2: 49,152 x 576, 113 MB in fp32), once in forward and once in
backward. With few rows neither product is compute-bound, and on CPU MKL runs them far below the
rate of reading the matrix: 3 rows took 23 ms forward + 14 ms backward, 2.2 % of a 4 x 512-token
LoRA step at fp32, work the model FLOPs do not count. Here the matrix is walked once, in chunks of
:func:`chunk_rows` rows (fewer as the rows grow): each chunk's logits, then the softmax numerators
times the same chunk (from cache where it fits), accumulated with an online softmax (the running
maximum rescales what came before, as in flash attention). Forward thus returns the loss and keeps the gradient of
its input (rows x hidden) for backward, which only scales it; the rows x vocabulary logits are
never materialised (400 MB for 2,048 labelled fp32 tokens on SmolLM2). Measured on 2 cores,
forward + backward, fp32: 3 rows 43 -> 12 ms, 48 rows 50 -> 38 ms, 1,024 rows 849 -> 599 ms;
bf16: 3 rows 5.3 -> 4.6 ms, 48 rows 15.1 -> 11.9 ms, 1,024 rows 416 -> 165 ms.

Values are those of ``F.cross_entropy(head(x).float(), targets, reduction="sum")`` with the
model's final-logit soft-capping (``tests/test_head_loss.py``). Only a frozen ``nn.Linear`` head on
the CPU takes this path; a trained, adapted or quantized head, or another device, runs the stock ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from affinage.models import contiguous_first_input
from affinage.module_hooks import bypassable

# Vocabulary rows per chunk, measured best on 2 cores at 3-1,024 labelled rows: fp32 1,024 (2.4 MB;
# 512-8,192 tried). In bf16 the best chunk shrinks as the rows grow, at about HALF_LOGITS logits a
# chunk: Gemma 3's 262,144 x 640 head, forward + backward, 12 rows 75 ms at 4,096 -> 58 ms at 32,768,
# 48 rows 111 -> 99 ms at 8,192, 256 rows 365 ms at 4,096 (16,384: 398 ms); SmolLM2's 49,152 x 576,
# 3 rows 15.6 -> 10.1 ms. oneDNN's products amortise a larger chunk; each chunk is ~15 small ops.
CHUNK = 1024
CHUNK_HALF = 4096  # for 2-byte dtypes, the fewest rows a chunk has
CHUNK_HALF_MAX = 32768  # and the most
HALF_LOGITS = 393_216  # labelled rows x chunk rows, for 2-byte dtypes
FEW_ROWS = 8  # fp32 below this many rows: a chunk's logits run faster as (W_c xᵀ)ᵀ than as x W_cᵀ (MKL)


def chunk_rows(element: int, rows: int = 1) -> int:
    """Vocabulary rows per chunk for weights of ``element`` bytes and ``rows`` labelled rows."""
    if element >= 4:
        return CHUNK
    fitted = 1 << (max(HALF_LOGITS // max(rows, 1), 1).bit_length() - 1)  # a power of two
    return max(CHUNK_HALF, min(fitted, CHUNK_HALF_MAX))


def chunked_head_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether ``head`` on ``hidden`` may run chunked: :func:`chunkable_head` on ``hidden``'s device and dtype."""
    return chunkable_head(head, hidden.dtype, hidden.device)


def chunkable_head(head: nn.Module | None, dtype: torch.dtype, device: torch.device) -> bool:
    """A frozen ``nn.Linear`` head (bias frozen or absent) of ``dtype`` on the CPU, outside autocast (whose
    products would round the chunks but not the target's logit), with its own ``forward`` and no hook but
    affinage's own (which changes no value), nor any global module hook: the head module itself is not
    called. A head whose weight trains needs its own gradient, which this path does not make."""
    return (
        type(head) is nn.Linear
        and device.type == "cpu"
        and head.weight.device == device
        and not torch.is_autocast_enabled("cpu")
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
        and head.weight.dtype == dtype
        and bypassable(head, harmless_pre_hooks=(contiguous_first_input,))
    )


def transient_bytes(rows: int, vocab: int, hidden: int, element: int, chunked: bool, gradient: bool = True) -> int:
    """The bytes the head and its loss hold at once for ``rows`` labelled rows (what ``--estimate`` counts).

    Stock: the head's output in the run's dtype (``element`` bytes), its fp32 copy, the log-softmax and,
    when training, the gradient. Chunked: one chunk's logits (the run's dtype and fp32, twice for the
    numerators, once more for a soft cap's slope), and, when training, the fp32 accumulators of the rows'
    gradient (two of ``hidden``)."""
    if not chunked:
        return rows * vocab * (element + (3 if gradient else 2) * 4)
    return rows * (min(chunk_rows(element, rows), vocab) * (element + 12) + (2 * hidden * 4 if gradient else 0))


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows @ weight.T + bias`` in fp32 or wider (rounded in the weight's dtype first, as the stock head's
    output is before its ``float()``)."""
    # fp32 with few rows: MKL runs W_c xᵀ 7x faster than x W_cᵀ at 3 rows; bf16 runs in oneDNN, no such gap
    if rows.shape[0] < FEW_ROWS and weight.element_size() >= 4:
        logits = (weight @ rows.t()).t() if bias is None else torch.addmm(bias[:, None], weight, rows.t()).t()
    else:
        logits = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
    return logits.to(_wide(logits))


def _wide(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _capped_(logits: torch.Tensor, cap: float | None, slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Soft-capped logits ``cap·tanh(z/cap)``, in place (``logits`` is a fresh tensor), and with ``slope``
    their derivative ``1 - tanh²`` (None without a cap)."""
    if not cap:
        return logits, None
    squashed = logits.div_(cap).tanh_()
    derivative = 1 - squashed * squashed if slope else None
    return squashed.mul_(cap), derivative


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, targets, cap, want_grad):
        count, wide = rows.shape[0], _wide(rows)
        running_max = rows.new_full((count, 1), float("-inf"), dtype=wide)
        total = rows.new_zeros((count, 1), dtype=wide)  # Σ exp(logit - running_max)
        weighted = rows.new_zeros(rows.shape, dtype=wide) if want_grad else None  # Σ that · dlogit/dz · W_v
        step = chunk_rows(weight.element_size(), count)
        for start in range(0, weight.shape[0], step):
            chunk = weight[start : start + step]
            chunk_bias = None if bias is None else bias[start : start + step]
            logits, slope = _capped_(_chunk_logits(rows, chunk, chunk_bias), cap, want_grad)
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            rescale = (running_max - new_max).exp_()
            numerators = logits.sub_(new_max).exp_()
            total.mul_(rescale).add_(numerators.sum(dim=1, keepdim=True))
            if want_grad:
                if slope is not None:
                    numerators.mul_(slope)
                weighted.mul_(rescale).add_(numerators.to(chunk.dtype) @ chunk)
            running_max = new_max
        target_rows = weight[targets].to(wide)
        target_logits = (rows.to(wide) * target_rows).sum(dim=1, keepdim=True)
        if bias is not None:
            target_logits += bias[targets, None].to(wide)
        target_logits, target_slope = _capped_(target_logits.to(rows.dtype).to(wide), cap, want_grad)
        loss = (running_max + total.log() - target_logits).sum()
        if want_grad:
            # d loss / d rows = Σ_v softmax_v · dz_v · W_v - dz_target · W_target
            own = target_rows if target_slope is None else target_slope * target_rows
            ctx.save_for_backward(weighted.div_(total).sub_(own))
            ctx.dtype = rows.dtype
        return loss

    @staticmethod
    @once_differentiable  # the gradient is made in forward: no graph of it for a second derivative
    def backward(ctx, grad):
        (grad_rows,) = ctx.saved_tensors
        return (grad_rows * grad).to(ctx.dtype), None, None, None, None, None


def head_cross_entropy(
    rows: torch.Tensor, head: nn.Module, targets: torch.Tensor, cap: float | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``head(rows)`` (logits in fp32, or fp64 for fp64 rows; soft-capped at
    ``cap`` if set) against ``targets``, vocabulary ids (drop ignored positions first): chunked where
    :func:`chunked_head_applies`, the stock ops otherwise."""
    if chunked_head_applies(head, rows):
        targets = targets.long()
        if targets.numel() and int(targets.min()) < 0:
            raise ValueError(
                f"head_cross_entropy: target {int(targets.min())} is not a vocabulary id (drop -100 first)"
            )
        want_grad = torch.is_grad_enabled() and rows.requires_grad
        return _ChunkedHeadLoss.apply(rows, head.weight, head.bias, targets, cap, want_grad)
    logits = head(rows).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="sum")
