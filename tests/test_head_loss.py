"""The head + cross-entropy at labelled positions, chunked over the vocabulary: the stock ops' loss and gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from affinage.models import contiguous_head_input
from affinage.training import head_loss
from affinage.training.head_loss import _ChunkedHeadLoss, chunked_head_applies, head_cross_entropy


def _head(vocab: int, hidden: int, bias: bool = False, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


def _stock(rows, head, targets, cap=None):
    logits = head(rows).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="sum")


def _loss_and_grad(fn, rows, head, targets, cap=None):
    rows = rows.detach().requires_grad_(True)
    loss = fn(rows, head, targets, cap)
    (grad,) = torch.autograd.grad(loss * 0.5, rows)  # a grad_output other than 1 reaches the rows
    return loss.detach(), grad


@pytest.mark.parametrize("count", [0, 1, 3, 8, 13, 40])  # both product layouts (FEW_ROWS) and no row at all
@pytest.mark.parametrize(("bias", "cap"), [(False, None), (True, None), (False, 3.0), (True, 30.0)])
def test_same_loss_and_gradient_as_the_stock_ops(monkeypatch, count, bias, cap):
    monkeypatch.setattr(head_loss, "CHUNK", 96)  # 1,000 = 10 full chunks + a partial one
    head = _head(1000, 48, bias)
    rows = torch.randn(count, 48) * 3  # logits of several units: the running maximum moves across chunks
    targets = torch.randint(0, 1000, (count,))
    assert chunked_head_applies(head, rows)
    expected, expected_grad = _loss_and_grad(_stock, rows, head, targets, cap)
    loss, grad = _loss_and_grad(head_cross_entropy, rows, head, targets, cap)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_double(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK", 7)
    head = _head(30, 6, bias=True, dtype=torch.float64)
    rows = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (5,))
    assert torch.autograd.gradcheck(
        lambda r: _ChunkedHeadLoss.apply(r, head.weight, head.bias, targets, 2.0, True), rows
    )


def test_bf16_is_as_close_to_fp32_as_the_stock_head(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_HALF", 300)  # several chunks in bf16 too
    monkeypatch.setattr(head_loss, "CHUNK_HALF_MAX", 300)
    head = _head(2000, 64)
    rows, targets = torch.randn(12, 64), torch.randint(0, 2000, (12,))
    reference, reference_grad = _loss_and_grad(_stock, rows.double(), head.double(), targets)
    low_head, low_rows = _head(2000, 64, dtype=torch.bfloat16), rows.bfloat16()
    stock, stock_grad = _loss_and_grad(_stock, low_rows, low_head, targets)
    chunked, chunked_grad = _loss_and_grad(head_cross_entropy, low_rows, low_head, targets)
    assert chunked_grad.dtype == torch.bfloat16
    assert abs(chunked.double() - reference) <= abs(stock.double() - reference) + 1e-3 * abs(reference)
    worst = (stock_grad.double() - reference_grad).abs().max()
    assert (chunked_grad.double() - reference_grad).abs().max() <= worst * 1.5


def test_without_gradient_the_loss_alone():
    head = _head(500, 32)
    rows, targets = torch.randn(6, 32), torch.randint(0, 500, (6,))
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(rows, head, targets), _stock(rows, head, targets))


def test_which_heads_run_chunked():
    rows = torch.randn(2, 16)
    head = _head(40, 16)
    contiguous_head_input(type("M", (), {"get_output_embeddings": lambda self: head})())  # affinage's own hook
    assert chunked_head_applies(head, rows)
    assert not chunked_head_applies(head, rows.double())  # another dtype than the weight
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not chunked_head_applies(head, rows)  # a global hook expects to see the head called
    finally:
        handle.remove()
    assert chunked_head_applies(head, rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not chunked_head_applies(head, rows)  # bf16 chunks against an fp32 target logit
    head.forward = lambda x: x  # what accelerate's hooks do: an instance forward the path would skip
    assert not chunked_head_applies(head, rows)
    del head.forward
    hook = head.register_full_backward_hook(lambda *args: None)
    assert not chunked_head_applies(head, rows)  # it would never fire
    hook.remove()
    head.register_forward_hook(lambda *args: None)
    assert not chunked_head_applies(head, rows)  # a user's hook could change the logits
    trained = _head(40, 16).requires_grad_(True)
    assert not chunked_head_applies(trained, rows)
    rows = rows.requires_grad_(True)
    loss = head_cross_entropy(rows, trained, torch.tensor([1, 2]))
    loss.backward()
    assert trained.weight.grad is not None and rows.grad is not None  # the stock ops: the head trains


def test_what_backward_keeps_is_the_rows_gradient_not_the_logits():
    from tests.conftest import saved_bytes

    head = _head(5000, 32)
    rows = torch.randn(20, 32, requires_grad=True)
    targets = torch.randint(0, 5000, (20,))
    _, chunked = saved_bytes(lambda: head_cross_entropy(rows, head, targets), skip=[head.weight])
    _, stock = saved_bytes(lambda: _stock(rows, head, targets), skip=[head.weight])
    assert chunked == 20 * 32 * 4  # the fp32 gradient of the rows, nothing vocabulary-sized
    assert stock >= 20 * 5000 * 4
    assert (
        head_loss.transient_bytes(20, 5000, 32, 4, chunked=True)
        < head_loss.transient_bytes(20, 5000, 32, 4, chunked=False) / 4
    )


def test_ignored_targets_are_refused_and_second_derivatives_raise():
    head = _head(100, 8)
    rows = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="drop -100"):
        head_cross_entropy(rows, head, torch.tensor([1, -100, 2]))
    weight = torch.tensor(2.0, requires_grad=True)  # the first gradient then requires grad: a graph to go on
    loss = head_cross_entropy(rows, head, torch.tensor([1, 5, 2])) * weight
    (grad,) = torch.autograd.grad(loss, rows, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # not a silently missing second-order term
        grad.square().sum().backward()


def test_no_gradient_work_under_no_grad():
    from tests.conftest import saved_bytes

    head = _head(500, 16)
    rows = torch.randn(4, 16, requires_grad=True)
    targets = torch.randint(0, 500, (4,))
    with torch.no_grad():
        loss, kept = saved_bytes(lambda: head_cross_entropy(rows, head, targets))
    assert kept == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, _stock(rows.detach(), head, targets))


def test_the_estimate_counts_chunk_buffers_on_the_heap_only_under_the_mmap_threshold():
    from affinage.training.estimate import heap_served_head

    assert heap_served_head(20, 49152, 2, chunked=True, transient=1234) == 1234
    assert heap_served_head(8192, 49152, 2, chunked=True, transient=1234) == 0  # 128 MiB chunks are mapped


def test_bf16_chunks_shrink_as_the_labelled_rows_grow():
    sizes = [head_loss.chunk_rows(2, rows) for rows in (1, 3, 12, 13, 48, 256, 4096)]
    assert sizes == [32768, 32768, 32768, 16384, 8192, 4096, 4096]
    assert head_loss.chunk_rows(4, 3) == head_loss.chunk_rows(4, 4096) == head_loss.CHUNK
