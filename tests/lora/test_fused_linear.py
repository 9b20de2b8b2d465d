"""Bases and LoRA updates of the layers reading one tensor, in one node: the separate layers' values and gradients."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from affinage.lora.fused import dropout_mask, masked, masked_
from affinage.lora.fused_linear import lora_linears, plain_base
from affinage.lora.layers import LoRALinear
from affinage.lora.shared_input import InputGroup
from tests.lora.test_fused import _stock


def _layers(outs=(24, 8, 8), bias=(True, False, True), scalings=(2.0, 0.5, 1.0)):
    torch.manual_seed(0)
    layers = []
    for out, with_bias, scaling in zip(outs, bias, scalings):
        layer = LoRALinear(nn.Linear(32, out, bias=with_bias).requires_grad_(False), r=4, alpha=4 * scaling)
        nn.init.normal_(layer.lora_B.weight, std=0.1)
        layers.append(layer)
    return layers


def _separate(x, layers, keep, p):
    return [
        (layer.base_layer(x) + _stock(x, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, keep, p)).reshape(
            -1, layer.out_features
        )
        for layer in layers
    ]


def _factors(layers):
    return [t for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)]


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_one_node_gives_the_separate_layers_values_and_gradients(count, p):
    layers = _layers()[:count]
    x = torch.randn(3, 7, 32)
    keep = dropout_mask(x, p) if p else None
    grads = [torch.randn(21, layer.out_features) for layer in layers]
    results = []
    for fused in (True, False):
        for layer in layers:
            layer.zero_grad()
        leaf = x.clone().requires_grad_()
        outs = lora_linears(leaf, layers, keep, p) if fused else _separate(leaf, layers, keep, p)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            torch.autograd.backward(outs, grads)
        if fused and not p:  # every input gradient accumulated within the products: no sum
            assert sum(e.count for e in profile.key_averages() if e.key == "aten::add") == 0
        results.append([o.detach() for o in outs] + [leaf.grad] + [t.grad.clone() for t in _factors(layers)])
    for ours, reference in zip(*results):  # fp32 sums in another order: a few ulps
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_an_unused_output_gives_no_factor_gradient():
    layers = _layers()
    x = torch.randn(5, 32, requires_grad=True)
    outs = lora_linears(x, layers, None, 0.0)
    (outs[0].sum() + outs[2].square().sum()).backward()
    assert layers[1].lora_B.weight.grad is None
    assert layers[1].lora_A.weight.grad is None or not layers[1].lora_A.weight.grad.any()
    reference = x.detach().clone().requires_grad_()
    ref = _separate(reference, layers, None, 0.0)
    (ref[0].sum() + ref[2].square().sum()).backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_double():
    layers = [layer.double() for layer in _layers(outs=(6, 3), bias=(True, False), scalings=(1.5, 0.5))]
    x = torch.randn(2, 3, 32, dtype=torch.double, requires_grad=True)
    keep = dropout_mask(x, 0.3)
    factors = _factors(layers)

    def run(x, *leaves):  # layers holding gradcheck's leaves as their factors
        views = [
            SimpleNamespace(base_layer=layer.base_layer, r=layer.r, scaling=layer.scaling,
                            lora_A=SimpleNamespace(weight=a), lora_B=SimpleNamespace(weight=b))
            for layer, a, b in zip(layers, leaves[::2], leaves[1::2])
        ]  # fmt: skip
        return lora_linears(x, views, keep, 0.3)

    leaves = [t.detach().clone().requires_grad_() for t in factors]
    assert torch.autograd.gradcheck(run, (x, *leaves))


def test_only_frozen_unhooked_linear_bases_of_the_input_dtype_are_plain():
    layer = _layers()[0]
    x = torch.randn(2, 32)
    assert plain_base(layer, x)
    assert not plain_base(layer, x.bfloat16())  # the base is fp32
    layer.base_layer.weight.requires_grad_(True)
    assert not plain_base(layer, x)
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(True)  # a trained bias gets its gradient from the base module's own node
    assert not plain_base(layer, x)
    layer.base_layer.bias.requires_grad_(False)
    for hooked in (
        layer.base_layer.register_forward_hook(lambda *args: None),
        layer.base_layer.register_full_backward_hook(lambda *args: None),
        nn.modules.module.register_module_forward_hook(lambda *args: None),  # every module's calls
    ):
        assert not plain_base(layer, x)  # the base module is called, so its hooks run
        hooked.remove()
    assert plain_base(layer, x)
    layer.base_layer.forward = lambda x: x  # an instance forward (accelerate's hooks): it must run
    assert not plain_base(layer, x)
    del layer.base_layer.forward
    assert plain_base(layer, x)


def test_a_grouped_layer_with_a_trained_bias_gives_it_its_gradient():
    layers = _layers(bias=(True, True, True))
    for layer in layers:
        layer.base_layer.bias.requires_grad_(True)
    group = InputGroup(layers)
    for layer in layers:
        layer.input_group = group
    x = torch.randn(4, 32)
    sum(layer(x).square().sum() for layer in layers).backward()
    ours = [layer.base_layer.bias.grad.clone() for layer in layers]
    for layer in layers:
        layer.zero_grad()
    sum(out.square().sum() for out in _separate(x, layers, None, 0.0)).backward()
    for got, layer in zip(ours, layers):
        torch.testing.assert_close(got, layer.base_layer.bias.grad)


def test_masked_keeps_bits_and_zeroes_the_rest_whatever_they_hold():
    x = torch.tensor([1.5, float("inf"), float("nan"), -2.0])
    keep = torch.tensor([True, False, False, True])
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.complex64):
        out = masked(x.to(dtype), keep)
        assert out.dtype == dtype and out.tolist() == [1.5, 0.0, 0.0, -2.0]
        fresh = x.to(dtype)
        assert masked_(fresh, keep).data_ptr() == fresh.data_ptr() and fresh.tolist() == [1.5, 0.0, 0.0, -2.0]
