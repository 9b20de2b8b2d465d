"""``BasicModelRunner``: the two-line API of seed 001, for a base model or a fine-tuned run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from affinage.data import config_transforms
from affinage.data.inference import inference_example, row_fields
from affinage.data.prompting import Prompting
from affinage.data.transforms import apply_transforms
from affinage.evaluate import generate
from affinage.evaluate.constrain import Constraint


class BasicModelRunner:
    """``BasicModelRunner("runs/email-router").predict("...")`` answers like the trained model.

    ``model_or_run`` is a run directory written by ``affinage train`` (its template and adapter
    are used) or any ``base_model`` value (the bare model with its chat template).
    """

    def __init__(self, model_or_run: str | Path, device: str | None = None):
        from affinage.run_dir import RunDir
        from affinage.runtime import setup

        device = setup(device)  # CUDA when present, unless told otherwise
        path = Path(model_or_run)
        if RunDir(path).is_run():
            from affinage.run import open_run

            run = open_run(path, device=device)
            self.model, self.tokenizer, self.prompting = run.model, run.tokenizer, run.prompting
            self.max_new_tokens = run.config.generation.max_new_tokens
            self.temperature = run.config.generation.temperature
            self.top_p = run.config.generation.top_p
            self.constraint = Constraint.from_config(run.config.generation.constraint)
            self.transforms = config_transforms(run.config)
            self.input_field, self.templated = row_fields(run.config)
        else:
            from affinage.models import load_base_model

            loaded = load_base_model(str(model_or_run), device=device)
            self.model, self.tokenizer, self.prompting = loaded.model, loaded.tokenizer, Prompting()
            self.max_new_tokens, self.temperature, self.top_p = 128, 0.0, 1.0
            self.constraint = None
            self.transforms = []
            self.input_field, self.templated = None, False

    def predict(
        self, prompt: str | dict[str, Any], max_new_tokens: int | None = None, constraint: Constraint | None = None
    ) -> str:
        return self.predict_many([prompt], max_new_tokens, constraint)[0]

    def predict_many(
        self,
        prompts: list[str | dict[str, Any]],
        max_new_tokens: int | None = None,
        constraint: Constraint | None = None,
    ) -> list[str]:
        """Answers for ``prompts``; ``constraint`` (else the run's generation.constraint) shapes every one."""
        # The prompt gets the run's prompt-side transforms (e.g. strip_accents), as in training.
        examples = [inference_example(p, input_field=self.input_field, templated=self.templated) for p in prompts]
        examples = apply_transforms(examples, self.transforms, prompt_side_only=True)
        return generate(
            self.model,
            self.tokenizer,
            examples,
            self.prompting,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            constraint=constraint or self.constraint,
        )
