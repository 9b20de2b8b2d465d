"""Where a LoRA training step's time goes, and how close it is to the machine's matmul ceiling.

Runs affinage's plan and loop (as `affinage bench` does) on rows of exactly ``--seq-len`` tokens
(random ids, a 3-token answer carrying the loss), LoRA on every linear layer of every block, and
times ``--steps`` steps after a warm-up, then profiles ``--profiled`` more with torch.profiler.
Prints the ceiling fraction (each timed step's model FLOPs over its time and the rate of one big
matmul measured right after it, :mod:`affinage.bench.machine`; the median over the steps, the
profiler's own cost left out) and the self time of the
operators in the profiled ones, grouped: the decoder's matmuls, attention, LoRA's small matmuls, elementwise
work (norms, RoPE, activations), the optimizer, and the rest.

``--parts`` times affinage's own autograd nodes (LoRA linears, attention, norm, gated product,
head loss; forward and backward apart) with a clock around each call during the timed steps,
and prints each one's share of them, the rest being stock operators, autograd and the optimizer.
Why beside the profiler: on a 2-vCPU virtual machine the profiler's per-operator cost made
elementwise operators look 4-6x slower than a clock around them showed.

    python benchmarks/profile_step.py --seq-len 256 --batch 8 --precision fp32
    python benchmarks/profile_step.py --seq-len 512 --batch 4 --top 30
``--budgets 512,2048`` trains with each token budget per forward (``trainer.max_tokens_per_forward``)
in turn, switching every step in one process (same model, optimizer and rows), and prints each
budget's step time and ceiling fraction: the machine's drift falls on all of them alike.

    python benchmarks/profile_step.py --seq-len 256 --batch 8 --profiled 0 --parts
    python benchmarks/profile_step.py --seq-len 256 --batch 8 --profiled 0 --steps 16 --budgets 512,2048

``--products`` clocks every matrix product of the timed steps by kind (:mod:`product_clock`) and
prints the fraction of the ceiling the step would reach were everything else free: the cap the
products' own rate sets.

    python benchmarks/profile_step.py --seq-len 256 --batch 8 --profiled 0 --dropout 0 --products
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator

import product_clock
import torch

from affinage.bench.machine import flops_per_token, matmul_flops, model_shape
from affinage.config import TrainerConfig
from affinage.data.template import Encoded
from affinage.lora.fused import _MaskedProjection
from affinage.lora.fused_linear import _LoRALinears
from affinage.lora.inject import inject_lora
from affinage.lora.layers import share_dropout
from affinage.lora.shared_input import share_inputs
from affinage.models import load_base_model, resolve_dtype
from affinage.runtime import set_threads
from affinage.training import BatchPlan, Listener, TrainState, lora_optimizer, run_plan
from affinage.training.block_attention import _BlockCausalAttention
from affinage.training.gated_mlp import _GatedProduct
from affinage.training.head_loss import _ChunkedHeadLoss
from affinage.training.loop import StepOptions, run_steps
from affinage.training.rms_norm import _RMSNorm

NODES = (_LoRALinears, _MaskedProjection, _BlockCausalAttention, _RMSNorm, _GatedProduct, _ChunkedHeadLoss)

GROUPS = (  # (group, substrings of operator names), the first match wins
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("adam", "_foreach")),
    ("elementwise", ("mul", "add", "silu", "rsqrt", "pow", "mean", "neg", "cat", "sub", "div", "exp", "where")),
    ("copies", ("copy_", "clone", "contiguous", "to_copy", "empty", "zero", "fill")),
)


def rows(vocab: int, seq_len: int, count: int, seed: int) -> list[Encoded]:
    rng = random.Random(seed)
    data = []
    for _ in range(count):
        ids = [rng.randrange(100, vocab) for _ in range(seq_len)]
        data.append(Encoded(input_ids=ids, labels=[-100] * (seq_len - 3) + ids[-3:], truncated=False))
    return data


@contextlib.contextmanager
def timed_nodes(seconds: dict[str, float]) -> Iterator[None]:
    """Within the block, every call of :data:`NODES`' forward and backward adds its wall-clock to
    ``seconds[name]`` (nested calls count in both: none of these nodes calls another)."""

    def clocked(name: str, method):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started

        return staticmethod(call)

    originals = [(node, vars(node)["forward"], vars(node)["backward"]) for node in NODES]
    for node, forward, backward in originals:
        node.forward = clocked(f"{node.__name__} forward", forward.__func__)
        node.backward = clocked(f"{node.__name__} backward", backward.__func__)
    try:
        yield
    finally:
        for node, forward, backward in originals:
            node.forward, node.backward = forward, backward


def print_parts(seconds: dict[str, float], step_seconds: float, steps: int) -> None:
    """Each node's seconds per timed step and share of the step; the rest is everything else."""
    print(f"affinage's nodes per timed step ({steps} steps, {step_seconds:.3f} s each, a clock around each call):")
    rest = step_seconds
    for name, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {total / steps * 1e3:8.0f} ms  {total / steps / step_seconds:6.1%}  {name}")
        rest -= total / steps
    print(f"  {rest * 1e3:8.0f} ms  {rest / step_seconds:6.1%}  the rest: stock operators, autograd, optimizer, loop")


def alternate_budgets(
    model: torch.nn.Module, plan: BatchPlan, cfg: TrainerConfig, budgets: list[int], dtype: torch.dtype
) -> dict[int, list[tuple[float, float]]]:
    """Train ``plan`` with ``budgets[i % len(budgets)]`` tokens per forward at step ``i``; per budget, each
    step's (seconds, the ceiling measured right after it), the first step (a warm-up) left out."""
    # run_plan's options but the budget; no recomputation: the plan's threshold is its own budget's, and
    # under it a larger budget's forwards would recompute, measuring checkpointing instead
    options = StepOptions(
        accumulation=cfg.gradient_accumulation, max_grad_norm=cfg.max_grad_norm, forward_budget=budgets[0]
    )
    timed: dict[int, list[tuple[float, float]]] = {budget: [] for budget in budgets}

    class Alternate(Listener):
        def on_step(self, state, report):
            if state.step > 1:
                timed[options.forward_budget].append((report.seconds, matmul_flops(dtype)))
            options.forward_budget = budgets[state.step % len(budgets)]

    optimizer = lora_optimizer(model, cfg)
    run_steps(
        model, plan.batches(), plan.train_loss_fn, optimizer, steps=plan.total_steps,
        lr_at=lambda step: cfg.learning_rate, options=options, listeners=[Alternate()],
    )  # fmt: skip
    return timed


def summary(timed: list[tuple[float, float]], tokens: int, shape: dict[str, int], seq_len: int) -> str:
    """Median step time, tokens/s and fraction of the ceiling (model FLOPs, each step against its own ceiling)."""
    fractions, base_only = (
        sorted(tokens * flops_per_token(shape, seq_len, adapter) / (s * c) for s, c in timed)
        for adapter in (True, False)
    )
    seconds = statistics.median(s for s, _ in timed)
    ceiling = statistics.median(c for _, c in timed)
    return (
        f"{seconds:.3f} s/step, {tokens / seconds:.0f} tokens/s, {statistics.median(fractions):.1%} of the matmul "
        f"ceiling (median of {len(timed)} steps, {fractions[0]:.1%}-{fractions[-1]:.1%}; ceiling "
        f"{ceiling / 1e12:.3f} TFLOP/s; without the adapter's FLOPs {statistics.median(base_only):.1%})"
    )


def group_of(name: str) -> str:
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after the first (a warm-up)")
    parser.add_argument("--profiled", type=int, default=2, help="steps profiled after the timed ones")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument(
        "--tokens-per-forward", default="auto", help="trainer.max_tokens_per_forward: auto, or a number of tokens"
    )
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument("--shapes", action="store_true", help="list operators by their input shapes too")
    parser.add_argument("--parts", action="store_true", help="time affinage's autograd nodes in the timed steps")
    parser.add_argument("--products", action="store_true", help="clock every matrix product of the timed steps")
    parser.add_argument("--budgets", help="tokens per forward to alternate step by step, e.g. 512,2048")
    args = parser.parse_args()

    threads = set_threads()
    dtype = resolve_dtype(args.precision, torch.device("cpu"))
    loaded = load_base_model(args.model, dtype=dtype)
    model = loaded.model
    shape = model_shape(model, rank=16)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=16, alpha=32, dropout=args.dropout)
    share_dropout(model)
    share_inputs(model)
    cfg = TrainerConfig(
        max_steps=1 + args.steps + args.profiled,
        batch_size=args.batch,
        learning_rate=2e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_tokens_per_forward=args.tokens_per_forward
        if args.tokens_per_forward == "auto"
        else int(args.tokens_per_forward),
    )
    data = rows(len(loaded.tokenizer), args.seq_len, args.batch * (1 + args.steps + args.profiled), seed=0)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu"))
    tokens = args.batch * args.seq_len
    heading = f"{args.model}, {dtype}, {threads} threads, {args.batch} x {args.seq_len} tokens"
    if args.budgets:
        budgets = [int(budget) for budget in args.budgets.split(",")]
        for budget, timed_steps in alternate_budgets(model, plan, cfg, budgets, dtype).items():
            print(f"{heading}, {budget} tokens per forward: {summary(timed_steps, tokens, shape, args.seq_len)}")
        return
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes)
    timed: list[tuple[float, float]] = []  # (seconds of a timed step, the ceiling measured right after it)
    parts: dict[str, float] = defaultdict(float)  # node -> seconds over the timed steps (--parts)
    step_parts: dict[str, float] = defaultdict(float)  # the same for the step running now
    clock = product_clock.for_model(model) if args.products else None
    products: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [seconds, FLOPs] (--products)

    class Profiled(Listener):
        def on_step(self, state, report):
            if 1 < state.step <= 1 + args.steps:
                for kind, (seconds, flops) in clock.totals.items() if clock else ():
                    products[kind][0] += seconds
                    products[kind][1] += flops
                # The machine's rate drifts by ±10 % over minutes here (shared cores): each step is
                # set against a ceiling measured next to it, not one measured once.
                timed.append((report.seconds, matmul_flops(dtype)))
                for name, seconds in step_parts.items():
                    parts[name] += seconds
            step_parts.clear()
            if clock:
                clock.totals.clear()  # the ceiling's product just measured included
                clock.on = state.step < 1 + args.steps
            if state.step == 1 + args.steps and args.profiled:
                profiler.start()

    with contextlib.ExitStack() as scopes:
        if args.parts:
            scopes.enter_context(timed_nodes(step_parts))
        if clock:
            scopes.enter_context(clock)
            scopes.enter_context(product_clock.in_backward(clock, NODES))
        run_plan(model, plan, lora_optimizer(model, cfg), cfg, state=TrainState(), listeners=[Profiled()])
    if args.profiled:
        profiler.stop()
    print(f"{heading}: {summary(timed, tokens, shape, args.seq_len)}")
    step_seconds = sum(s for s, _ in timed) / len(timed)
    if args.parts:
        print_parts(parts, step_seconds, len(timed))
    if args.products:
        ceiling = statistics.median(c for _, c in timed)
        model_flops = tokens * flops_per_token(shape, args.seq_len)
        expected = 4 * shape["linear_weights"] * tokens
        print(product_clock.report(products, len(timed), step_seconds, model_flops, ceiling, expected))
    if not args.profiled:
        return
    events = profiler.key_averages(group_by_input_shape=args.shapes)
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total
    print(
        "self time by group: "
        + ", ".join(f"{g} {t / total:.1%}" for g, t in sorted(groups.items(), key=lambda x: -x[1]))
    )
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = event.self_cpu_time_total / total
        shapes = f" {event.input_shapes}" if args.shapes else ""
        print(f"  {share:6.1%}  {event.count:6d} calls  {group_of(event.key):11s} {event.key}{shapes}")


if __name__ == "__main__":
    main()
