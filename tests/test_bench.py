"""`affinage bench --quick` runs every side end to end on a tiny model (it asserts nothing about speed)."""

import json

import pytest

from affinage.bench import main, ratios

PEERS_ON_CPU = ("trl-speed", "trl-memory", "peft-loop")  # trl-liger only on CUDA with liger-kernel installed


@pytest.mark.integration
def test_quick_benchmark_runs_every_side(capsys):
    assert main(["--quick", "--steps", "2", "--seq-len", "96", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    sides = results["sides"]
    assert set(PEERS_ON_CPU) | {"affinage"} <= set(sides)
    for side in sides.values():
        assert side["steps"] == 2 and side["tokens"] > 0 and side["peak_memory_mb"] > 0
        assert side["held_out_loss"] > 0 and 0 <= side["ceiling_fraction"] < 1
    # The same data, model and seed: every side starts from the same loss (random LoRA A, zero B).
    for peer in PEERS_ON_CPU:
        assert sides["affinage"]["held_out_loss"] == pytest.approx(sides[peer]["held_out_loss"], rel=0.05)
    assert {"torch", "transformers", "peft", "trl", "python"} <= set(results["versions"])
    assert results["machine"]["matmul_tflops"] > 0 and set(results["config"]) == set(sides)
    assert results["ratios"]["fastest_peer"] in PEERS_ON_CPU and results["ratios"]["lightest_peer"] in PEERS_ON_CPU


def test_ratios_are_against_the_fastest_and_the_lightest_peer():
    sides = {
        "affinage": {"tokens_per_second": 300.0, "peak_memory_mb": 1000.0, "held_out_loss": 1.0},
        "trl-speed": {"tokens_per_second": 200.0, "peak_memory_mb": 4000.0, "held_out_loss": 1.0},
        "trl-memory": {"tokens_per_second": 100.0, "peak_memory_mb": 2000.0, "held_out_loss": 1.0},
        "peft-loop": {"error": "out of memory"},
    }
    got = ratios(sides)
    assert (got["fastest_peer"], got["tokens_per_second"]) == ("trl-speed", 1.5)
    assert (got["lightest_peer"], got["peak_memory"]) == ("trl-memory", 0.5)
    assert ratios({"affinage": sides["affinage"], "peft-loop": sides["peft-loop"]}) == {}


def _benchmark_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_parts_clock_a_node_and_put_it_back():
    from collections import defaultdict

    import torch

    from affinage.training.rms_norm import _RMSNorm

    profile = _benchmark_module("profile_step")
    forward, backward = _RMSNorm.forward, _RMSNorm.backward
    x = torch.randn(4, 8, requires_grad=True)
    seconds: dict[str, float] = defaultdict(float)
    with profile.timed_nodes(seconds):
        _RMSNorm.apply(x, torch.ones(8), 1e-6).sum().backward()
    assert set(seconds) == {"_RMSNorm forward", "_RMSNorm backward"} and all(s > 0 for s in seconds.values())
    assert (_RMSNorm.forward, _RMSNorm.backward) == (forward, backward)
    grad = x.grad.clone()
    x.grad = None
    _RMSNorm.apply(x, torch.ones(8), 1e-6).sum().backward()  # after: the same values, nothing clocked
    assert torch.equal(x.grad, grad) and len(seconds) == 2


def test_scaling_cells_hold_examples_of_exactly_the_cell_length(tmp_path, tokenizer):
    from affinage.data.formats import load_examples
    from affinage.data.template import encode_example

    data = _benchmark_module("scaling").long_prompt_data(tmp_path / "long.jsonl", rows=3, chars=300 * 6)
    encoded = [encode_example(tokenizer, e, 300) for e in load_examples(data)]
    assert [len(e.input_ids) for e in encoded] == [300, 300, 300]
    assert all(
        e.labels[-1] == tokenizer.eos_token_id and e.labels[0] == -100 for e in encoded
    )  # the answer survives the cut


@pytest.mark.integration
def test_quick_scaling_grid_runs(capsys):
    assert _benchmark_module("scaling").main(["--quick", "--cells", "64x2", "--steps", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] == 64 and row["ratios"]["tokens_per_second"] > 0
    assert all(side["tokens_per_second"] > 0 for side in row["sides"].values())


def test_model_flops_count_the_adapter_as_trained_weights():
    from affinage.bench.machine import flops_per_token, model_shape
    from affinage.lora.inject import inject_lora
    from tests.conftest import tiny_llama

    model = tiny_llama(64)
    shape = model_shape(model, rank=8)
    inject_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    factors = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert shape["adapter_weights"] == factors  # every decoder linear adapted, the head not
    attention = 6 * 10 * shape["hidden"] * shape["blocks"]
    assert flops_per_token(shape, 10) == 4 * shape["linear_weights"] + 6 * factors + attention
    assert flops_per_token(shape, 10, adapter=False) == 4 * shape["linear_weights"] + attention


def test_alternate_budgets_switches_the_token_budget_every_step(tokenizer):
    """Steps alternate 16 and 64 tokens per forward: four forwards of one 16-token row, then one of four."""
    import torch

    from affinage.config import TrainerConfig
    from affinage.lora import mark_only_lora_as_trainable
    from affinage.training import BatchPlan

    from .conftest import adapted_tiny, tiny_llama

    profile = _benchmark_module("profile_step")
    model = adapted_tiny(tiny_llama, tokenizer)
    mark_only_lora_as_trainable(model)
    cfg = TrainerConfig(max_steps=5, batch_size=4, learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0)
    plan = BatchPlan.build(model, profile.rows(len(tokenizer), 16, 20, seed=0), [], cfg, pad_id=0)
    rows_per_forward: list[int] = []
    model.get_decoder().register_forward_hook(lambda module, args, kwargs, out: rows_per_forward.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)  # fmt: skip
    timed = profile.alternate_budgets(model, plan, cfg, [16, 64], torch.float32)
    assert rows_per_forward == [1, 1, 1, 1, 4, 1, 1, 1, 1, 4, 1, 1, 1, 1]  # steps 1-5: 16, 64, 16, 64, 16
    assert {budget: len(steps) for budget, steps in timed.items()} == {16: 2, 64: 2}  # the first step a warm-up
    assert all(seconds > 0 and ceiling > 0 for steps in timed.values() for seconds, ceiling in steps)


def test_product_clock_sorts_products_by_kind_and_counts_their_flops():
    import product_clock
    import torch
    import torch.nn.functional as F

    decoder, head = torch.randn(12, 8), torch.randn(20, 8)
    factor_a = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(5, 8, requires_grad=True)
    clock = product_clock.ProductClock([decoder], [head])

    class Doubled(torch.autograd.Function):  # a node whose backward runs a product, as affinage's do
        @staticmethod
        def forward(ctx, rows):
            return F.linear(rows, decoder)

        @staticmethod
        def backward(ctx, grad):
            return grad @ decoder

    original = vars(Doubled)["backward"]
    with clock, product_clock.in_backward(clock, [Doubled]):
        F.linear(x, decoder)  # clock off: not counted
        clock.on = True
        F.linear(x, decoder.t().contiguous().t())  # another storage than the decoder's own: not a decoder product
        F.linear(x, decoder[:6])  # a view of the decoder's weight is still the decoder's
        x @ head.t()
        torch.bmm(x[None], factor_a.t()[None])
        torch.zeros(5, 4).addmm_(x, factor_a.t())
        Doubled.apply(x).sum().backward()
    assert vars(Doubled)["backward"] is original  # put back
    totals = {kind: (round(seconds > 0), flops) for kind, (seconds, flops) in clock.totals.items()}
    assert totals == {
        "decoder linears": (1, 2 * 5 * 6 * 8 + 2 * (2 * 5 * 12 * 8)),  # the view, Doubled's forward and backward
        "head": (1, 2 * 5 * 20 * 8),
        "attention": (1, 2 * 5 * 4 * 8),  # batched: 3-D
        "LoRA factors and the rest": (1, 2 * 5 * 12 * 8 + 2 * 5 * 4 * 8),  # the copy, then addmm_'s factors
    }
    text = product_clock.report(clock.totals, 1, 1.0, model_flops=1e3, ceiling=1e12, expected_decoder_flops=2400)
    assert "decoder linears seen: 100.0% of their model FLOPs" in text
