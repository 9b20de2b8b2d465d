"""LoRA layers reading the same tensor share one A product: the values and gradients of separate layers."""

import copy

import pytest
import torch
from torch import nn

from affinage.data.batching import collate
from affinage.lora.layers import LoRALinear, share_dropout
from affinage.lora.shared_input import InputGroup, share_inputs
from affinage.training import causal_lm_loss
from tests.conftest import adapted_tiny, tiny_gemma3, tiny_llama, trainable_grads
from tests.test_train import _encoded


def _step(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both sides
    loss, count = causal_lm_loss(model, batch)
    (loss / count).backward()
    return loss.detach(), trainable_grads(model)


@pytest.mark.parametrize(
    ("build", "dropout", "dtype"),
    [(tiny_llama, 0.0, torch.float32), (tiny_llama, 0.1, torch.float32), (tiny_gemma3, 0.1, torch.float32),
     (tiny_llama, 0.0, torch.bfloat16)],
)  # fmt: skip
def test_grouped_layers_give_the_loss_and_gradients_of_separate_ones(build, dropout, dtype, tokenizer):
    plain = adapted_tiny(build, tokenizer, dropout=dropout).to(dtype)
    share_dropout(plain)
    for module in plain.modules():  # the factors stay fp32, as inject_lora makes them
        if isinstance(module, LoRALinear):
            module.lora_A.float(), module.lora_B.float()
    grouped = copy.deepcopy(plain)
    share_dropout(grouped)
    assert share_inputs(grouped) == 5 * grouped.config.num_hidden_layers  # q/k/v and gate/up of every block
    layer = grouped.get_decoder().layers[0]
    assert layer.self_attn.q_proj.input_group is layer.self_attn.v_proj.input_group
    assert layer.mlp.gate_proj.input_group is layer.mlp.up_proj.input_group
    assert layer.self_attn.o_proj.input_group is None and layer.mlp.down_proj.input_group is None
    batch = collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)
    plain.train(), grouped.train()
    (plain_loss, plain_grads), (loss, grads) = _step(plain, batch), _step(grouped, batch)
    # bf16: a few ulps (ungrouped layers sum base and LoRA input gradients inside one product, one rounding)
    tolerance = {"rtol": 2e-2, "atol": 4e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, plain_loss, **tolerance)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, **tolerance)
    assert layer.self_attn.q_proj.input_group._served is None  # no graph kept once every member is served


def test_layers_with_their_own_dropout_masks_are_not_grouped(tokenizer):
    model = adapted_tiny(tiny_llama, tokenizer, dropout=0.1)  # independent masks (shared_dropout_mask: false)
    assert share_inputs(model) == 0


def test_a_member_fed_another_tensor_computes_its_own():
    torch.manual_seed(0)
    first, second = LoRALinear(nn.Linear(8, 8), r=2, alpha=4), LoRALinear(nn.Linear(8, 6), r=3, alpha=3)
    for layer in (first, second):
        nn.init.normal_(layer.lora_B.weight)
    expected = copy.deepcopy(first), copy.deepcopy(second)
    group = InputGroup([first, second])
    first.input_group = second.input_group = group
    x, y = torch.randn(4, 8), torch.randn(4, 8)  # as a cross-attention's query and key read different tensors
    torch.testing.assert_close(first(x), expected[0](x))
    torch.testing.assert_close(second(y), expected[1](y))
    torch.testing.assert_close(second(x), expected[1](x))
    torch.testing.assert_close(first(x), expected[0](x))


def test_a_model_whose_forward_cannot_run_the_probe_stays_ungrouped():
    class NeedsTwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = LoRALinear(nn.Linear(4, 4), r=2, alpha=2), LoRALinear(nn.Linear(4, 4), r=2, alpha=2)

        def forward(self, input_ids, other):
            return self.a(other) + self.b(other)

    model = NeedsTwoInputs()
    assert share_inputs(model) == 0
    assert share_inputs(model, probe={"input_ids": None, "other": torch.randn(2, 4)}) == 2
    assert model.training  # the probe's eval() is undone
