"""The CUDA paths, where a GPU is present (skipped elsewhere): masks, the fused update, a training run, memory.

CI has no GPU; these run on a lent GPU machine (benchmarks/gpu.sh runs them first).
"""

import copy

import pytest
import torch

from affinage.config import TrainerConfig
from affinage.lora import inject_lora
from affinage.lora.fused import dropout_mask, lora_update
from affinage.lora.fused_linear import lora_linears
from affinage.training import BatchPlan, History, lora_optimizer, peak_memory_mb, resolve_forward_budget, run_plan
from tests.conftest import tiny_llama
from tests.test_train import TINY_RUN, _encoded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def test_dropout_mask_on_the_gpu_keeps_one_minus_p():
    torch.manual_seed(0)
    keep = dropout_mask(torch.empty(1001, 999, device=CUDA), 0.1)
    assert keep.device.type == "cuda" and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.9) < 0.002


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_update_on_the_gpu_matches_the_cpu(dtype):
    torch.manual_seed(0)
    x, a, b = torch.randn(3, 7, 32), torch.randn(8, 32) * 0.1, torch.randn(16, 8) * 0.1
    keep = dropout_mask(x, 0.1)
    grad = torch.randn(3, 7, 16)
    results = []
    for device in ("cpu", "cuda"):
        # fresh leaves on each device (x.to() on the CPU would hand back x itself)
        leaves = [t.to(device, kind).clone().requires_grad_() for t, kind in ((x, dtype), (a, a.dtype), (b, b.dtype))]
        out = lora_update(*leaves, 2.0, keep.to(device), 0.1)
        out.backward(grad.to(device, out.dtype))
        results.append([t.detach().float().cpu() for t in (out, *(leaf.grad for leaf in leaves))])
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    for on_gpu, on_cpu in zip(results[1], results[0]):
        torch.testing.assert_close(on_gpu, on_cpu, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_in_one_node_on_the_gpu_match_the_cpu(dtype):
    from tests.lora.test_fused_linear import _layers

    layers = _layers()
    x = torch.randn(3, 7, 32)
    keep = dropout_mask(x, 0.1)
    grads = [torch.randn(21, layer.out_features) for layer in layers]
    results = []
    for device in ("cpu", "cuda"):
        moved = [copy.deepcopy(layer).to(device) for layer in layers]
        for layer in moved:
            layer.base_layer.to(dtype)  # a plain base is in the input's dtype; the factors stay fp32
        leaf = x.to(device, dtype).clone().requires_grad_()
        outs = lora_linears(leaf, moved, keep.to(device), 0.1)
        torch.autograd.backward(outs, [g.to(device, dtype) for g in grads])
        factors = [t.grad for layer in moved for t in (layer.lora_A.weight, layer.lora_B.weight)]
        results.append([t.detach().float().cpu() for t in (*outs, leaf.grad, *factors)])
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    for on_gpu, on_cpu in zip(results[1], results[0]):
        torch.testing.assert_close(on_gpu, on_cpu, **tolerance)


def _run(tokenizer, device: torch.device) -> tuple[list[float], torch.nn.Module]:
    model = tiny_llama(len(tokenizer), seed=0)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)  # drawn on the CPU: the same factors on both
    model.to(device)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": 4})
    torch.manual_seed(cfg.seed)
    optimizer = lora_optimizer(model, cfg)
    data = _encoded(tokenizer)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=tokenizer.pad_token_id, device=device)
    history = History()
    run_plan(model, plan, optimizer, cfg, listeners=[history], device=device)
    return [r["loss"] for r in history.records if "loss" in r], model


def test_a_training_run_on_the_gpu_gives_the_cpu_losses(tokenizer):
    torch.cuda.reset_peak_memory_stats()
    on_gpu, model = _run(tokenizer, CUDA)
    on_cpu, _ = _run(tokenizer, torch.device("cpu"))
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert peak_memory_mb(CUDA) > 0 and resolve_forward_budget("auto", CUDA) is None
