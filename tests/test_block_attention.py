"""Blockwise causal attention: SDPA's values and gradients, for every mask a decoder builds, and
SDPA itself wherever blockwise would be wrong or slower."""

import pytest
import torch
import torch.nn.functional as F

from affinage.training import block_attention
from affinage.training.block_attention import block_causal_attention, blockwise_causal_attention, supported
from tests.conftest import assert_same_step, step_without_and_with, tiny_gemma3, tiny_llama, training_batch


def _inputs(batch=2, heads=6, kv_heads=2, length=150, dim=16, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


def _sdpa(query, key, value, mask):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None)


def _masks(length):
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, length, length).clone()
    padded[1, :, :, 100:] = False  # the second row has 100 real tokens
    padded[1, :, 100:, :] = causal[100:]  # pad queries read the tokens before them (finite, as SDPA)
    segment = torch.arange(length) // 40  # packed rows: four sequences, each its own causal block
    packed = (causal & (segment[:, None] == segment[None, :])).expand(2, 1, length, length)
    position = torch.arange(length)
    sliding = (causal & (position[:, None] - position[None, :] < 16)).expand(2, 1, length, length)
    return {"causal": None, "padded": padded, "packed": packed, "sliding": sliding}


@pytest.fixture
def two_threads():
    """Two threads, as on the machines measured: an odd count of KV-head matrices is then cut in halves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["causal", "padded", "packed", "sliding"])
@pytest.mark.parametrize("batch,kv_heads", [(2, 2), (1, 3)])  # 4 matrices per block; 3, each cut in 2
def test_values_and_gradients_are_sdpas_for_every_decoder_mask(kind, batch, kv_heads, two_threads):
    mask = _masks(150)[kind]
    mask = None if mask is None else mask[:batch]
    query, key, value = _inputs(batch=batch, kv_heads=kv_heads)
    rows = block_attention.BLOCK * query.shape[1] // kv_heads
    assert block_attention._parts(batch * kv_heads, rows) == (2 if batch * kv_heads % 2 else 1)
    grad_out = torch.randn(query.shape, dtype=query.dtype)
    expected = _sdpa(query, key, value, mask)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_out)
    got = block_causal_attention(query, key, value, mask, query.shape[-1] ** -0.5)
    grads = torch.autograd.grad(got, (query, key, value), grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-9)


def test_parts_make_the_matrices_a_multiple_of_the_threads(two_threads):
    assert [block_attention._parts(matrices, 192) for matrices in (1, 2, 3, 4, 6)] == [2, 1, 2, 1, 1]
    assert block_attention._parts(3, 2 * block_attention.MIN_PART_ROWS - 2) == 1  # halves too short
    assert block_attention._parts(3, 191) == 1  # rows that do not halve
    torch.set_num_threads(4)
    assert [block_attention._parts(matrices, 192) for matrices in (2, 3, 4)] == [2, 4, 1]


def test_gradcheck_on_a_length_that_is_not_a_multiple_of_the_block(two_threads):
    query, key, value = _inputs(batch=1, heads=2, kv_heads=1, length=block_attention.BLOCK + 5, dim=4)
    assert torch.autograd.gradcheck(lambda q, k, v: block_causal_attention(q, k, v, None, 0.5), (query, key, value))


def test_bf16_is_computed_in_fp32_at_most_as_far_from_fp64_as_sdpas_bf16():
    reference = [t.detach() for t in _inputs(length=256, dim=64)]
    exact = _sdpa(*reference, None)
    low = [t.to(torch.bfloat16) for t in reference]
    sdpa_error = (_sdpa(*low, None).double() - exact).norm()
    ours = block_causal_attention(*low, None, 64**-0.5)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - exact).norm() <= 1.05 * sdpa_error


def test_sdpa_runs_where_blockwise_would_be_wrong_or_slower():
    query, key, value = _inputs(dtype=torch.float32)
    assert supported(query, key, None, 0.0)
    assert supported(query, key, _masks(150)["padded"], 0.0)
    bidirectional = torch.ones(2, 1, 150, 150, dtype=torch.bool)  # a prefix-LM or image span reads later keys
    assert not supported(query, key, bidirectional, 0.0)
    assert not supported(query, key, None, 0.1)  # attention dropout
    assert not supported(query, key, None, 0.0, softcap=30.0)
    assert not supported(query, key[:, :, :100], None, 0.0)  # queries shorter than keys: a cache
    assert not supported(query.double(), key.double(), None, 0.0)
    with torch.no_grad():
        assert not supported(query, key, None, 0.0)
    long_query, long_key, _ = _inputs(batch=1, length=block_attention.MAX_LENGTH + 1, dtype=torch.float32)
    assert not supported(long_query, long_key, None, 0.0)
    assert block_attention.saved_bytes(64, 32, 512) > block_attention.MAX_SAVED_BYTES  # memory capped


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_a_training_step_has_sdpas_loss_and_gradients_and_the_model_is_restored(build, tokenizer, monkeypatch):
    model, batch = training_batch(build, tokenizer)
    calls = []
    original = block_attention.block_causal_attention
    monkeypatch.setattr(block_attention, "block_causal_attention", lambda *a: calls.append(a[3]) or original(*a))
    plain, blockwise = step_without_and_with(model, batch, blockwise_causal_attention)
    assert len(calls) == model.config.num_hidden_layers  # every block ran blockwise, with the padding mask
    assert all(mask is not None for mask in calls)
    assert_same_step(plain, blockwise, rtol=1e-4, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"
