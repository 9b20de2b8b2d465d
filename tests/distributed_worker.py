"""One process of a hand-launched gloo group for tests/test_distributed.py: a few loop steps on a tiny model.

Run as ``python -m tests.distributed_worker NAN_RANK`` with torch's env:// variables set (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); prints one JSON line: each step's loss, skip and gradient norm, and the LoRA weights' sum.
"""

from __future__ import annotations

import json
import sys

import torch

from affinage import distributed
from affinage.config import TrainerConfig
from affinage.training import BatchPlan, causal_lm_loss, lora_optimizer, run_plan
from tests.conftest import _tokenizer
from tests.test_train import TINY_RUN, _encoded
from tests.test_train_parts import _model


def main(nan_rank: int) -> None:
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    tokenizer = _tokenizer()
    model, data = _model(tokenizer), _encoded(tokenizer)
    cfg = TrainerConfig(**{**TINY_RUN, "max_steps": 4, "max_nonfinite_steps": 3})
    calls = {"n": 0}

    def loss(model, batch):  # this process's loss is NaN in step 2 (one forward per step here)
        calls["n"] += 1
        value, count = causal_lm_loss(model, batch)
        return (value * float("nan"), count) if calls["n"] == 2 and distributed.rank() == nan_rank else (value, count)

    torch.manual_seed(cfg.seed)
    optimizer = lora_optimizer(model, cfg)
    plan = BatchPlan.build(model, data, [], cfg, pad_id=tokenizer.pad_token_id, loss_fn=loss)
    reports = []

    class Record:
        def __getattr__(self, name):  # every other hook: nothing to do
            return lambda *args: False if name == "should_stop" else None

        def on_step(self, state, report):
            reports.append({"loss": report.loss, "skipped": report.skipped, "grad_norm": report.grad_norm})

    run_plan(model, plan, optimizer, cfg, listeners=[Record()])
    weights = sum(float(p.detach().double().sum()) for n, p in model.named_parameters() if "lora_" in n)
    print(json.dumps({"rank": distributed.rank(), "steps": reports, "weights": weights}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
