"""The fused LoRA update: the gradients of the stock ops, a fraction of their saved memory."""

import functools

import pytest
import torch
import torch.nn.functional as F

from affinage.lora.fused import dropout_mask, dropout_rate, lora_update
from affinage.lora.layers import LoRALinear, share_dropout
from tests.conftest import saved_bytes


def _stock(x, a, b, scaling, keep, p):
    dropped = x if keep is None else x * keep / (1 - dropout_rate(p))
    return F.linear(F.linear(dropped, a), b) * scaling


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep = dropout_mask(torch.empty(1001, 999), p)  # an element count that is not a multiple of 4
    assert keep.dtype == torch.bool and keep.shape == (1001, 999)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * sigma
    lanes = keep.flatten()[: n - n % 4].view(-1, 4).float()  # each 16-bit lane of a word is its own draw
    assert all(abs(lanes[:, i].mean().item() - (1 - p)) < 8 * sigma for i in range(4))
    assert abs(torch.corrcoef(lanes.t())[0, 1].item()) < 0.01
    assert abs(dropout_rate(p) - p) <= 1 / 65536


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_in_double(p):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    keep = dropout_mask(x, p) if p else None
    assert torch.autograd.gradcheck(lambda x, a, b: lora_update(x, a, b, 1.5, keep, p), (x, a, b))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_same_output_and_gradients_as_stock_ops(p):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32)
    a, b = torch.randn(8, 32) * 0.1, torch.randn(16, 8) * 0.1
    keep = dropout_mask(x, p) if p else None
    grad = torch.randn(3, 7, 16)
    results = []
    for fn in (lora_update, _stock):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        out = fn(*leaves, 2.0, keep, p)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_layer_in_training_uses_its_mask_and_keeps_fp32_factors_for_bf16_input():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8, dropout=0.25)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(5, 32)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    keep = dropout_mask(x, 0.25)
    expected = layer.base_layer(x) + _stock(x, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, keep, 0.25)
    torch.testing.assert_close(out, expected)
    layer.base_layer.to(torch.bfloat16)
    layer(x.to(torch.bfloat16)).float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32


def test_shared_mask_keeps_input_and_the_masks_bits_for_three_layers():
    torch.manual_seed(0)
    block = torch.nn.ModuleDict(
        {n: LoRALinear(torch.nn.Linear(256, 256), r=8, alpha=16, dropout=0.1) for n in ("q", "k", "v")}
    )
    share_dropout(block)
    block.train()

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return sum(layer(x) for layer in self.block.values())

    x = torch.randn(4, 64, 256, requires_grad=True)
    attention = Attention()
    _, saved = saved_bytes(lambda: attention(x).sum(), skip=list(attention.parameters()))
    hidden = 3 * 4 * 64 * 8 * 4  # the rank-8 intermediates, fp32
    # the input once (fp32) + the shared mask as bits per layer (3/8 of one boolean mask; one with share_inputs);
    # stock ops keep 3 float noises + 3 copies
    assert saved <= x.numel() * 4 + 3 * x.numel() / 8 + hidden


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_recomputable_input_is_recomputed_in_backward_not_kept(checkpointed):
    """An input declared recomputable from tensors kept anyway costs no memory of its own: the same
    gradients, its sources kept instead of it (and under checkpointing, the same gradients again)."""
    from torch.utils.checkpoint import checkpoint

    from affinage.recompute import recomputable

    torch.manual_seed(0)
    gate, up = (torch.randn(3, 8, 32, requires_grad=True) for _ in range(2))
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    keep = dropout_mask(gate, 0.3)

    def update(declare):
        product = F.silu(gate) * up
        if declare:
            recomputable(product, lambda g, u: F.silu(g) * u, gate, up)
        return lora_update(product, a, b, 2.0, keep, 0.3).square().sum()

    results = []
    for declare in (False, True):
        gate.grad = up.grad = a.grad = b.grad = None
        run = functools.partial(checkpoint, update, use_reentrant=False) if checkpointed else update
        loss, saved = saved_bytes(functools.partial(run, declare), skip=[gate, up, a, b])
        loss.backward()
        results.append((loss.detach(), [t.grad.clone() for t in (gate, up, a, b)], saved))
    (plain_loss, plain_grads, plain_saved), (loss, grads, saved) = results
    assert torch.equal(loss, plain_loss)
    for grad, plain_grad in zip(grads, plain_grads):
        assert torch.equal(grad, plain_grad)  # the recipe returns the very tensor: bit for bit
    if not checkpointed:  # silu and the product keep gate, silu(gate) and up; the projection kept the product too
        assert plain_saved - saved == gate.numel() * 4


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 64, 96), (1,)])
def test_a_mask_is_kept_as_bits_and_comes_back_whole(shape):
    from affinage.lora.fused import pack_mask, unpack_mask

    keep = torch.rand(shape) > 0.3
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(packed, keep.shape), keep)


def test_every_pattern_of_eight_elements_packs_to_its_own_byte():
    from affinage.lora.fused import pack_mask, unpack_mask

    patterns = torch.tensor([[(value >> bit) & 1 for bit in range(8)] for value in range(256)], dtype=torch.bool)
    packed = pack_mask(patterns)
    assert packed.unique().numel() == 256
    assert torch.equal(unpack_mask(packed, patterns.shape), patterns)


@pytest.mark.parametrize("rows", [1, 13, 64])
def test_a_mask_drawn_block_by_block_is_the_whole_inputs_and_gives_its_gradients(rows, monkeypatch):
    """Drawn inside the projection (keep=None, p > 0) over several row blocks: the very mask
    ``dropout_mask`` draws for the whole input from the same seed, so the stock ops' values."""
    import affinage.lora.fused as fused

    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 8 * 12)  # 8-row blocks of a 12-wide input
    x = torch.randn(rows, 12)
    a, b = torch.randn(4, 12) * 0.1, torch.randn(5, 4) * 0.1
    grad = torch.randn(rows, 5)
    torch.manual_seed(7)
    keep = dropout_mask(x, 0.3)
    results = []
    for fn, mask in ((lora_update, None), (_stock, keep)):
        torch.manual_seed(7)
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        out = fn(*leaves, 2.0, mask, 0.3)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    assert len(fused.row_blocks(rows, 12)) == -(-rows // 8)
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_row_blocks_cover_the_rows_in_whole_bytes_of_mask():
    from affinage.lora.fused import row_blocks

    for rows, width in ((1, 3), (9, 5), (1000, 576), (4096, 1536), (3, 1 << 22)):
        blocks = row_blocks(rows, width)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
        assert all((start * width) % 8 == 0 for start, _ in blocks)
