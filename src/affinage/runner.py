"""``BasicModelRunner``: the two-line API of seed 001, for a base model or a fine-tuned run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from affinage.data import config_transforms
from affinage.data.formats import Example, alpaca_prompt
from affinage.data.transforms import apply_transforms
from affinage.evaluate import Prompting, generate


class BasicModelRunner:
    """``BasicModelRunner("runs/email-router").predict("...")`` answers like the trained model.

    ``model_or_run`` is a run directory written by ``affinage train`` (its template and adapter
    are used) or any ``base_model`` value (the bare model with its chat template).
    """

    def __init__(self, model_or_run: str | Path, device: str = "cpu"):
        from affinage.pipeline import set_threads

        set_threads()
        path = Path(model_or_run)
        if (path / "config.yaml").is_file():
            from affinage.run import load_run

            run = load_run(path, device=device)
            self.model, self.tokenizer, self.prompting = run.model, run.tokenizer, run.prompting
            self.max_new_tokens = run.config.generation.max_new_tokens
            self.temperature = run.config.generation.temperature
            self.top_p = run.config.generation.top_p
            self.transforms = config_transforms(run.config)
            self.input_field, self.templated = row_fields(run.config)
        else:
            from affinage.models import load_base_model

            loaded = load_base_model(str(model_or_run), device=device)
            self.model, self.tokenizer, self.prompting = loaded.model, loaded.tokenizer, Prompting()
            self.max_new_tokens, self.temperature, self.top_p = 128, 0.0, 1.0
            self.transforms = []
            self.input_field, self.templated = None, False

    def predict(self, prompt: str | dict[str, Any], max_new_tokens: int | None = None) -> str:
        return self.predict_many([prompt], max_new_tokens)[0]

    def predict_many(self, prompts: list[str | dict[str, Any]], max_new_tokens: int | None = None) -> list[str]:
        # The prompt gets the run's prompt-side transforms (e.g. strip_accents), as in training.
        examples = [to_example(p, input_field=self.input_field, templated=self.templated) for p in prompts]
        examples = apply_transforms(examples, self.transforms, prompt_side_only=True)
        return generate(
            self.model,
            self.tokenizer,
            examples,
            self.prompting,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )


def row_fields(config: Any) -> tuple[str | None, bool]:
    """The run's prompt column (input_features) and whether a literal template fills from rows."""
    from affinage.data import feature_fields
    from affinage.data.template import is_literal_template

    return feature_fields(config)[0], is_literal_template(config.prompt.template)


def to_example(
    item: str | dict[str, Any], where: str = "", *, input_field: str | None = None, templated: bool = False
) -> Example:
    """A bare string or a data row (prompt, instruction/input, messages, or the run's own
    input column / template fields) as an inference example."""
    if isinstance(item, str):
        return Example(
            prompt=item,
            completion="",
            row={"prompt": item, **({input_field: item} if input_field else {})},
            source=where,
        )
    if templated:
        return Example(prompt=None, completion="", row=item, source=where)  # the template is filled from the row
    if input_field and input_field in item:
        return Example(prompt=str(item[input_field]), completion="", row=item, source=where)
    if "messages" in item:
        messages = [m for m in item["messages"]]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # predict the final answer, not the one already given
        return Example(prompt=None, completion="", messages=messages, row=item, source=where)
    if "instruction" in item:
        return Example(
            prompt=alpaca_prompt(str(item["instruction"]), item.get("input")), completion="", row=item, source=where
        )
    if "prompt" in item:
        return Example(prompt=str(item["prompt"]), completion="", row=item, source=where)
    from affinage.errors import DataError

    raise DataError(
        f"row has none of prompt, instruction, messages (fields: {', '.join(sorted(item))})",
        where=where,
        fix="give each row a 'prompt' field",
    )
