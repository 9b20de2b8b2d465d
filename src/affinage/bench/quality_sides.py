"""One side of the time-to-quality benchmark, in this process: affinage's recipe or the PEFT + TRL one.

Both sides start their clock at the same point (torch imported, nothing else), then import their
stack, read and encode the data, load the model, inject LoRA and train as their recipe says. Every
``probe_every`` optimizer steps a :class:`Probe` stops the clock, measures held-out accuracy with
the same scorer for both (affinage's label scoring on the same rendered prompts), and starts the
clock again; the run stops at the first probe at or above the threshold. What each side's clock
holds is what its user waits for: imports, data, loading, the frozen-prefix pass, steps,
validation and checkpoints if the recipe has them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ROOT / "benchmarks" / "time-to-quality"


class Probe:
    """Held-out accuracy every ``every`` steps, on a clock that does not run while it measures.

    Each record is also appended to ``log`` (JSON lines) as it is made, so a side stopped from
    outside still leaves its curve; past ``time_limit`` seconds on its clock the side stops.
    """

    def __init__(
        self,
        sets: dict[str, list],
        scorer: Any,
        every: int,
        threshold: float,
        time_limit: float | None = None,
        log: str | None = None,
        started: float | None = None,
    ) -> None:
        self.sets, self.scorer, self.every, self.threshold = sets, scorer, every, threshold
        self.time_limit, self.log = time_limit, log
        self.started = time.perf_counter() if started is None else started  # the side's clock, from its start
        self.paused = 0.0
        self.records: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        """Seconds on the side's clock: since it started, probes left out."""
        return time.perf_counter() - self.started - self.paused

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def measure(self, model: Any, step: int) -> bool:
        """Record the held-out accuracy at ``step``; True (stop) once it reaches the threshold or the time limit."""
        seconds, began = self.elapsed(), time.perf_counter()
        was_training = model.training
        with torch.no_grad():
            correct = {name: self.scorer(model, examples) for name, examples in self.sets.items()}
        model.train(was_training)
        total = sum(len(examples) for examples in self.sets.values())
        accuracy = sum(correct[name] * len(self.sets[name]) for name in self.sets) / max(total, 1)
        self.records.append(
            {
                "step": step,
                "seconds": round(seconds, 2),
                "accuracy": round(accuracy, 4),
                "sets": {name: round(value, 4) for name, value in correct.items()},
                "probe_seconds": round(time.perf_counter() - began, 2),
            }
        )
        if self.log:
            with open(self.log, "a", encoding="utf-8") as out:
                out.write(json.dumps(self.records[-1]) + "\n")
        self.paused += time.perf_counter() - began
        return accuracy >= self.threshold or (self.time_limit is not None and seconds >= self.time_limit)


def affinage_config(args: argparse.Namespace, quick_model: Path | None) -> Any:
    """affinage's recipe, as the benchmark runs it (``--quick``: a tiny model and a few steps)."""
    from affinage.config import load_config

    overrides = list(args.set_affinage or [])
    if quick_model is not None:
        overrides = [f"base_model={quick_model}", "adapter.layers_to_transform=1", "trainer.max_steps=4", *overrides]
    return load_config(args.recipe, overrides)


def held_out(config: Any, args: argparse.Namespace) -> dict[str, list]:
    """The probe sets: the recipe's ``eval.sets`` named by ``--probe-sets``, each cut to ``--probe-examples``."""
    from affinage.data import load_eval_sets

    sets = load_eval_sets(config, {name: config.eval.sets[name] for name in args.probe_sets.split(",")})
    return {name: examples[: args.probe_examples] for name, examples in sets.items()}


def side_probe(config: Any, tokenizer: Any, labels: list[str], args: argparse.Namespace, started: float) -> Probe:
    """The probe a side is measured by: the same held-out sets, scorer, cadence and threshold for both."""
    scorer = accuracy_scorer(config, tokenizer, labels)
    return Probe(
        held_out(config, args),
        scorer,
        args.probe_every,
        args.threshold,
        args.time_limit,
        args.probe_log,
        started=started,
    )


def accuracy_scorer(config: Any, tokenizer: Any, labels: list[str]) -> Any:
    """The scorer both sides are measured with: affinage's label scoring (the config's prompt, its labels)."""
    from affinage.data.prompting import Prompting
    from affinage.evaluate.task import evaluate_examples
    from affinage.models import contiguous_head_input

    prompting, task = Prompting.from_config(config), {"task": "classification", "labels": labels}

    def score(model: Any, examples: list) -> float:
        # The head gets a contiguous input while probing, as affinage's loader arranges (a plain Gemma 3
        # copies its 262k-row head per batch row otherwise: 12x slower scoring). It changes no number, and
        # probes are off both clocks; the peer trains without it (its head input is contiguous there).
        hook = contiguous_head_input(model)
        try:
            metrics = evaluate_examples(model, tokenizer, examples, task, config, prompting, with_loss=False)
        finally:
            if hook is not None:
                hook.remove()
        return float(metrics["accuracy"])

    return score


def run_affinage(args: argparse.Namespace, quick_model: Path | None, workdir: Path) -> dict[str, Any]:
    probe_box: list[Probe] = []
    started = time.perf_counter()
    from affinage.pipeline import run_training
    from affinage.training import Listener

    config = affinage_config(args, quick_model)

    class Probing(Listener):
        def __init__(self, probe: Probe, model: Any) -> None:
            self.probe, self.model, self.reached = probe, model, False

        def on_step(self, state: Any, report: Any) -> None:
            if self.probe.due(state.step) and not self.reached:
                self.reached = self.probe.measure(self.model, state.step)

        def should_stop(self, state: Any) -> bool:
            return self.reached

    def watch(prepared: Any) -> list[Listener]:
        probe = side_probe(prepared.config, prepared.tokenizer, prepared.task["labels"], args, started)
        probe_box.append(probe)
        return [Probing(probe, prepared.model)]

    summary = run_training(config, workdir / "run", compare_base=False, progress=False, log=_quiet, watch=watch)
    return {
        "probes": probe_box[0].records if probe_box else [],
        "steps_trained": summary.get("steps"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "recipe": str(args.recipe),
    }


def peer_recipe(path: Path, quick: bool) -> dict[str, Any]:
    """The PEFT + TRL recipe file: ``lora`` (LoraConfig keywords) and ``sft`` (SFTConfig keywords)."""
    recipe = yaml.safe_load(path.read_text())
    if quick:
        recipe["lora"]["layers_to_transform"] = [1]
        recipe["sft"]["max_steps"] = 4
    return recipe


def run_peer(args: argparse.Namespace, quick_model: Path | None, workdir: Path) -> dict[str, Any]:
    """PEFT + TRL as its user writes it: from_pretrained, get_peft_model, SFTTrainer on the same ids."""
    started = time.perf_counter()
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from affinage.data import load_splits
    from affinage.evaluate.task import detect_task, encode_all
    from affinage.models import load_tokenizer, resolve_dtype, resolve_model_path
    from affinage.training import peak_memory_mb

    config = affinage_config(args, quick_model)  # the data, split, prompt and labels: the same as affinage's
    recipe = peer_recipe(Path(args.peer_recipe), quick_model is not None)
    splits = load_splits(config)
    path = str(resolve_model_path(config.base_model))
    tokenizer = load_tokenizer(path)
    rows = [
        {"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]}
        for e in encode_all(tokenizer, splits.train, config)
    ]
    dtype = resolve_dtype(config.trainer.precision, torch.device("cpu"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), LoraConfig(**recipe["lora"]))
    probe = side_probe(config, tokenizer, detect_task(config, splits.train)["labels"], args, started)

    class Probing(TrainerCallback):
        def on_step_end(self, _args, state, control, **_):
            if probe.due(state.global_step) and probe.measure(model.get_base_model(), state.global_step):
                control.should_training_stop = True

    sft = SFTConfig(
        output_dir=str(workdir / "trl"),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        completion_only_loss=True,
        bf16=dtype == torch.bfloat16,
        use_cpu=True,
        seed=config.trainer.seed,
        **recipe["sft"],
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Probing()]
    )
    trainer.train()
    return {
        "probes": probe.records,
        "steps_trained": trainer.state.global_step,
        "peak_memory_mb": round(peak_memory_mb(torch.device("cpu")), 1),
        "recipe": str(args.peer_recipe),
    }


def _quiet(message: str) -> None:
    """The recipe's log lines are not the benchmark's output (one JSON line on stdout)."""
