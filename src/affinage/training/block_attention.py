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

Any boolean mask inside the causal triangle works (padding, packed sequences, sliding windows);
a mask that lets a query see a later key, attention dropout, soft-capping, sinks, a query shorter
than its keys (a cache), no gradient, or a device other than the CPU go to SDPA unchanged.
:func:`blockwise_causal_attention` switches a model to it for the duration of training only.
"""

from __future__ import annotations

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


def _by_position(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, L, D) as (B·Hkv, L·group, D): the query heads sharing a KV head side by side at each position,
    so a block of positions is a contiguous block of rows (no copy per block). One copy in all."""
    batch, heads, length, dim = tensor.shape
    grouped = tensor.reshape(batch, kv_heads, heads // kv_heads, length, dim).transpose(2, 3)
    return grouped.reshape(batch * kv_heads, length * (heads // kv_heads), dim)


def _by_head(rows: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """:func:`_by_position`'s layout back to (B, H, L, D), as a view of a contiguous (B, L, H, D) tensor: the
    layout SDPA's caller wants next (its ``transpose(1, 2).contiguous()`` is then free). One copy."""
    kv_rows, total, dim = rows.shape
    kv_heads = kv_rows // batch
    length = total * kv_heads // heads
    by_token = rows.view(batch, kv_heads, length, heads // kv_heads, dim).transpose(1, 2)
    return by_token.contiguous().view(batch, length, heads, dim).transpose(1, 2)


class _BlockCausalAttention(torch.autograd.Function):
    """softmax(scale · Q Kᵀ + mask) V over query blocks; Q (B, H, L, D), K/V (B, Hkv, L, D).

    The scale is applied inside the score and gradient products (their ``alpha``), not by a pass
    over the queries or the gradients."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        queries = _by_position(query, kv_heads)
        keys, values = key.reshape(batch * kv_heads, length, dim), value.reshape(batch * kv_heads, length, dim)
        out = torch.empty_like(queries)
        probs = []
        lowest = torch.finfo(query.dtype).min  # not -inf: a row with every key masked stays finite
        for (start, end), hidden in zip(_blocks(length), _blocked_masks(mask, length, query.device)):
            rows = queries[:, start * group : end * group]
            scores = torch.baddbmm(rows.new_empty(()), rows, keys[:, :end].transpose(1, 2), beta=0, alpha=scale)
            blocked = scores.view(batch, kv_heads, end - start, group, end)
            if mask is None:  # causal: only the block's own square has later keys
                blocked[..., start:].masked_fill_(hidden, lowest)
            else:
                blocked.masked_fill_(hidden, lowest)
            prob = torch.softmax(scores, dim=-1)
            out[:, start * group : end * group] = torch.bmm(prob, values[:, :end])  # not out=: a slice runs per batch
            probs.append(prob)
        ctx.save_for_backward(queries, key, value, out, *probs)
        ctx.scale, ctx.heads = scale, heads
        return _by_head(out, batch, heads)

    @staticmethod
    def backward(ctx, grad_out):
        queries, key, value, out, *probs = ctx.saved_tensors
        batch, kv_heads, length, dim = key.shape
        group = ctx.heads // kv_heads
        keys, values = key.reshape(batch * kv_heads, length, dim), value.reshape(batch * kv_heads, length, dim)
        grad_rows_all = _by_position(grad_out, kv_heads)
        # softmax backward needs Σ_k dP·P per row, which is dO·O (L x D values instead of L x L)
        row_dots = (grad_rows_all * out).sum(-1, keepdim=True)
        grad_queries = torch.empty_like(queries)
        grad_key = torch.zeros_like(keys)
        grad_value = torch.zeros_like(values)
        for (start, end), prob in zip(_blocks(length), probs):
            span = slice(start * group, end * group)
            rows, grad_rows = queries[:, span], grad_rows_all[:, span]
            grad_value[:, :end].baddbmm_(prob.transpose(1, 2), grad_rows)
            grad_prob = torch.bmm(grad_rows, values[:, :end].transpose(1, 2))
            # dS = P ⊙ (dP − Σ_k dP·P)
            grad_scores = grad_prob.sub_(row_dots[:, span]).mul_(prob)
            grad_queries[:, span] = torch.baddbmm(
                grad_scores.new_empty(()), grad_scores, keys[:, :end], beta=0, alpha=ctx.scale
            )
            grad_key[:, :end].baddbmm_(grad_scores.transpose(1, 2), rows, alpha=ctx.scale)
        return (
            _by_head(grad_queries, batch, ctx.heads),
            grad_key.view(batch, kv_heads, length, dim),
            grad_value.view(batch, kv_heads, length, dim),
            None,
            None,
        )


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
