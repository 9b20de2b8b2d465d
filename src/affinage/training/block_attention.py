"""Causal attention for CPU training, in query blocks with the query heads of a KV head folded.

Why not SDPA's CPU flash kernel: at 128-512 tokens its backward runs at ~30 % of the matmul
ceiling (profile in docs/performance.md), a tenth of a LoRA step. Here a block of ``BLOCK``
queries attends to the keys up to its end only (causal rows never read later keys: at 512
tokens 56 % of the score matrix is computed instead of 100 %), and the query heads that share a
key/value head (GQA) are stacked along the rows so every score and value product is one batched
matmul with ``heads/kv_heads`` times more rows, without copying K and V per head. The softmax
probabilities are kept for backward instead of recomputed: the recompute (a matmul and an
``exp`` over the scores) cost more than it saved; the memory is capped (``MAX_SAVED_BYTES`` per
call, about 5 MB per 512-token row on SmolLM2), above it and above 512 tokens SDPA runs.

The queries, the output and their gradients are held block after block in one buffer
(:class:`_Blocks`), so each block is a contiguous view the products read and write (``out=``)
without a copy per block. When a block's matrices (batch x KV heads) are not a multiple of the
threads, each is cut into row ranges that make them one (:func:`_parts`): one 512-token row of
SmolLM2 has 3, which two threads split 2 + 1; cut in 6, its attention step is ~2 % faster.

Any boolean mask inside the causal triangle works (padding, packed sequences, sliding windows);
a mask that lets a query see a later key, attention dropout, soft-capping, sinks, a query shorter
than its keys (a cache), no gradient, or a device other than the CPU go to SDPA unchanged.
:func:`blockwise_causal_attention` switches a model to it for the duration of training only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "affinage_block_causal"
BLOCK = 64  # queries per block: measured best of 32-512 at 128-1024 tokens (fp32, 2 cores)
MAX_SAVED_BYTES = 8 * 2**20  # probabilities kept for backward, per call
MIN_PART_ROWS = 32  # a block's matrices are not cut below this many rows
MAX_LENGTH = 512  # measured faster than SDPA up to here; at 1024 tokens it is not
DTYPES = (torch.float32, torch.bfloat16)  # bf16 runs in fp32 here: as accurate as fp32, still faster than SDPA's bf16


def _blocks(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + BLOCK, length)) for start in range(0, length, BLOCK)]


def saved_bytes(batch: int, heads: int, length: int, itemsize: int = 4) -> int:
    """The probabilities one call keeps for backward: every block's rows times the keys up to its end."""
    return batch * heads * sum((end - start) * end for start, end in _blocks(length)) * itemsize


def _blocked_masks(mask: torch.Tensor | None, length: int, device: torch.device) -> list[torch.Tensor]:
    """Per block, where scores are masked, shaped to broadcast over (batch, kv heads, rows, group, keys)."""
    if mask is None:  # causal only: the block's own square, where later keys are
        later = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=device).triu_(1)[:, None]
        return [later[: end - start, :, : end - start] for start, end in _blocks(length)]
    hidden = ~mask[:, :, :, None]  # (batch, 1, rows, 1, keys)
    return [hidden[:, :, start:end, :, :end] for start, end in _blocks(length)]


def _parts(matrices: int, rows: int) -> int:
    """Into how many row ranges each block's matrices are cut so their count is a multiple of the threads.

    Why: a batched product of 3 matrices on 2 threads gives one thread 2 and the other 1 (SmolLM2,
    one 512-token row: 3 KV heads); its products ran at 69 % of the ceiling, cut in 6 halves at 90 %."""
    threads = torch.get_num_threads()
    parts = threads // math.gcd(matrices, threads)
    return parts if parts > 1 and rows % parts == 0 and rows // parts >= MIN_PART_ROWS else 1


class _Blocks:
    """A (B, H, L, D) tensor as its query blocks: block ``b`` a contiguous (B·Hkv, n_b·group, D) matrix
    per KV head, the query heads sharing it side by side at each position (the rows a block's
    scores need, without copying K and V per head). All blocks live in one buffer, block after
    block, so a block is a view, cut into row ranges (:func:`_parts`) and written with ``out=``."""

    def __init__(self, shape: tuple[int, ...], buffer: torch.Tensor):
        """``shape``: (B, H, Hkv, L, D); ``buffer``: B·H·L·D values."""
        self.shape = shape
        self.spans = _blocks(shape[3])
        self.buffer = buffer

    @classmethod
    def of(cls, tensor: torch.Tensor, kv_heads: int) -> _Blocks:
        """``tensor`` (B, H, L, D) copied into blocks (two copies: the whole blocks, the shorter last one)."""
        batch, heads, length, dim = tensor.shape
        blocks = cls((batch, heads, kv_heads, length, dim), tensor.new_empty(tensor.numel()))
        for part, source in zip(blocks._regions(), blocks._positions(tensor)):
            part.copy_(source)
        return blocks

    def block(self, index: int, parts: int = 1) -> torch.Tensor:
        """Block ``index`` as (B·Hkv·parts, n·group/parts, D), a view of the buffer."""
        batch, heads, kv_heads, _, dim = self.shape
        start, end = self.spans[index]
        offset = batch * heads * start * dim
        rows = (end - start) * heads // kv_heads
        return self.buffer[offset : offset + batch * kv_heads * rows * dim].view(batch * kv_heads * parts, -1, dim)

    def whole(self) -> torch.Tensor:
        """(B, H, L, D) as a view of a contiguous (B, L, H, D) tensor: the layout SDPA's caller wants next
        (its ``transpose(1, 2).contiguous()`` is then free). One copy."""
        batch, heads, _, length, dim = self.shape
        out = self.buffer.new_empty(batch, length, heads, dim)
        for part, target in zip(self._regions(), self._positions(out.transpose(1, 2))):
            target.copy_(part)
        return out.transpose(1, 2)

    def _regions(self) -> list[torch.Tensor]:
        """The buffer as (blocks, B, Hkv, BLOCK, group, D) for the whole blocks, (B, Hkv, n, group, D) for the last."""
        batch, heads, kv_heads, length, dim = self.shape
        whole = length // BLOCK
        size = whole * batch * heads * BLOCK * dim
        regions = [self.buffer[:size].view(whole, batch, kv_heads, BLOCK, heads // kv_heads, dim)]
        if length % BLOCK:
            regions.append(self.buffer[size:].view(batch, kv_heads, length % BLOCK, heads // kv_heads, dim))
        return regions

    def _positions(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` (B, H, L, D) viewed like :meth:`_regions`."""
        batch, heads, kv_heads, length, dim = self.shape
        whole = length // BLOCK
        grouped = tensor.unflatten(1, (kv_heads, heads // kv_heads))  # (B, Hkv, group, L, D)
        views = [grouped[:, :, :, : whole * BLOCK].unflatten(3, (whole, BLOCK)).permute(3, 0, 1, 4, 2, 5)]
        if length % BLOCK:
            views.append(grouped[:, :, :, whole * BLOCK :].transpose(2, 3))
        return views


class _BlockCausalAttention(torch.autograd.Function):
    """softmax(scale · Q Kᵀ + mask) V over query blocks; Q (B, H, L, D), K/V (B, Hkv, L, D).

    The scale is applied inside the score and gradient products (their ``alpha``), not by a pass
    over the queries or the gradients."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        queries = _Blocks.of(query, kv_heads)
        out = _Blocks(queries.shape, torch.empty_like(queries.buffer))
        keys, values = key.reshape(batch * kv_heads, length, dim), value.reshape(batch * kv_heads, length, dim)
        parts = _parts(batch * kv_heads, BLOCK * group) if length >= BLOCK else 1  # only whole blocks are cut
        split = _repeated(parts, keys, values)
        probs = []
        lowest = torch.finfo(query.dtype).min  # not -inf: a row with every key masked stays finite
        for index, ((start, end), hidden) in enumerate(zip(queries.spans, _blocked_masks(mask, length, query.device))):
            cut = _cut(start, end, parts)
            keys_, values_ = split if cut > 1 else (keys, values)
            rows = queries.block(index, cut)
            scores = torch.baddbmm(rows.new_empty(()), rows, keys_[:, :end].transpose(1, 2), beta=0, alpha=scale)
            blocked = scores.view(batch, kv_heads, end - start, group, end)
            if mask is None:  # causal: only the block's own square has later keys
                blocked[..., start:].masked_fill_(hidden, lowest)
            else:
                blocked.masked_fill_(hidden, lowest)
            prob = torch.softmax(scores, dim=-1)
            torch.bmm(prob, values_[:, :end], out=out.block(index, cut))
            probs.append(prob)
        ctx.save_for_backward(queries.buffer, key, value, out.buffer, *probs)
        ctx.scale, ctx.heads, ctx.parts = scale, heads, parts
        return out.whole()

    @staticmethod
    def backward(ctx, grad_out):
        query_buffer, key, value, out_buffer, *probs = ctx.saved_tensors
        batch, kv_heads, length, dim = key.shape
        parts = ctx.parts
        grad_rows = _Blocks.of(grad_out, kv_heads)
        queries, grads = (
            _Blocks(grad_rows.shape, query_buffer),
            _Blocks(grad_rows.shape, torch.empty_like(query_buffer)),
        )
        keys, values = key.reshape(batch * kv_heads, length, dim), value.reshape(batch * kv_heads, length, dim)
        # softmax backward needs Σ_k dP·P per row, which is dO·O (L x D values instead of L x L)
        row_dots = (grad_rows.buffer.view(-1, dim) * out_buffer.view(-1, dim)).sum(-1)
        dots = _Blocks((*grad_rows.shape[:4], 1), row_dots)
        split = _repeated(parts, keys, values)
        kv_grads = (torch.zeros_like(keys), torch.zeros_like(values))
        split_grads = tuple(torch.zeros_like(t) for t in split) if split else None
        for index, ((start, end), prob) in enumerate(zip(queries.spans, probs)):
            cut = _cut(start, end, parts)
            keys_, values_ = split if cut > 1 else (keys, values)
            grad_key, grad_value = split_grads if cut > 1 else kv_grads
            rows, grad_block = queries.block(index, cut), grad_rows.block(index, cut)
            grad_value[:, :end] += torch.bmm(prob.transpose(1, 2), grad_block)
            grad_prob = torch.bmm(grad_block, values_[:, :end].transpose(1, 2))
            # dS = P ⊙ (dP − Σ_k dP·P)
            grad_scores = grad_prob.sub_(dots.block(index, cut)).mul_(prob)
            torch.baddbmm(
                grad_scores.new_empty(()),
                grad_scores,
                keys_[:, :end],
                beta=0,
                alpha=ctx.scale,
                out=grads.block(index, cut),
            )
            grad_key[:, :end] += torch.baddbmm(
                grad_scores.new_empty(()), grad_scores.transpose(1, 2), rows, beta=0, alpha=ctx.scale
            )
        grad_key, grad_value = kv_grads
        if split_grads:
            grad_key += split_grads[0].view(batch * kv_heads, parts, length, dim).sum(1)
            grad_value += split_grads[1].view(batch * kv_heads, parts, length, dim).sum(1)
        return (
            grads.whole(),
            grad_key.view(batch, kv_heads, length, dim),
            grad_value.view(batch, kv_heads, length, dim),
            None,
            None,
        )


def _cut(start: int, end: int, parts: int) -> int:
    """Into how many row ranges block ``start:end`` is cut: ``parts`` for a whole block, none for the shorter
    last one (forward and backward must agree: the kept probabilities have the cut's shape)."""
    return parts if end - start == BLOCK else 1


def _repeated(parts: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Each (B·Hkv, L, D) tensor with every matrix repeated ``parts`` times (one per row range), or None."""
    return tuple(t.repeat_interleave(parts, dim=0) for t in tensors) if parts > 1 else None


def block_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention output (B, H, L, D); ``mask`` boolean (B, 1, L, L), True where a query may read a key, or None
    for causal. The mask must lie inside the causal triangle (:func:`supported` checks).

    Computed in fp32 whatever the inputs: scores rounded to bf16 before the softmax doubled the
    error of SDPA's bf16 kernel (which keeps them in fp32), and in fp32 this still runs faster."""
    compute = torch.promote_types(query.dtype, torch.float32)
    inputs = [t.to(compute) for t in (query, key, value)]
    return _BlockCausalAttention.apply(*inputs, mask, scale).to(query.dtype)


def would_run(batch: int, heads: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a training forward of this shape runs blockwise (what ``--estimate`` asks too)."""
    return (
        device.type == "cpu"
        and dtype in DTYPES
        and 2 <= length <= MAX_LENGTH
        and saved_bytes(batch, heads, length) <= MAX_SAVED_BYTES
    )


def supported(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float, **kwargs) -> bool:
    """Whether this call may run blockwise (else SDPA runs it as before)."""
    batch, heads, length, _ = query.shape
    if not torch.is_grad_enabled() or not would_run(batch, heads, length, query.dtype, query.device):
        return False
    if dropout or key.shape[2] != length or heads % key.shape[1]:
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias")):
        return False
    if mask is None:
        return True
    # A later key visible (bidirectional spans, prefix-LM) needs the full score matrix.
    return mask.dtype == torch.bool and mask.shape[-2:] == (length, length) and not mask.triu(1).any()


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: blockwise when :func:`supported`, SDPA otherwise."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or not supported(query, key, attention_mask, dropout, **kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = block_causal_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D), as SDPA's forward returns it


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # SDPA's masks: None when causal alone suffices


def _configs(model: nn.Module) -> list:
    """The model's config and its sub-configs (a multimodal model's text config has its own setting)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    subs = [getattr(config, name) for name in getattr(config, "sub_configs", {}) or {}]
    return [config] + [sub for sub in subs if sub is not None]


@contextmanager
def blockwise_causal_attention(model: nn.Module) -> Iterator[bool]:
    """Within the block, a model that runs SDPA runs :func:`attention_forward`; yields whether it switched."""
    switched = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"]
    for config in switched:
        config._attn_implementation = NAME
    try:
        yield bool(switched)
    finally:
        for config in switched:
            config._attn_implementation = "sdpa"
