"""The one place where an example becomes tokens.

Training, evaluation, prediction and export all call :func:`render_prompt` and
:func:`encode_example`, so the text the model is trained on is exactly the text it is asked
at inference (a train/inference template mismatch is the field's most reported bug).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from affinage.data.formats import Example
from affinage.errors import DataError


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fill_template(template: str, example: Example) -> str:
    fields = template_fields(template)
    values = dict(example.row)
    if example.prompt is not None and len(fields) == 1 and fields[0] not in values:
        values[fields[0]] = example.prompt  # a bare text fills a one-placeholder template
    missing = [name for name in fields if name not in values]
    if missing:
        raise DataError(
            f"template placeholder {{{missing[0]}}} has no matching field (fields: {', '.join(sorted(values)) or 'none'})",
            where=example.source or "prompt.template",
            fix="rename the placeholder or add the field to every row",
        )
    return template.format_map({name: "" if values[name] is None else values[name] for name in fields})


def uses_chat_template(tokenizer: Any, template: str | None) -> bool:
    return template is None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, example: Example, template: str | None = None, system: str | None = None) -> str:
    """The exact prompt text the model sees before its answer."""
    if template is not None:
        return _fill_template(template, example)
    if not uses_chat_template(tokenizer, template):
        return example.prompt or ""
    messages = list(example.messages or [])
    if example.prompt is not None:
        messages.append({"role": "user", "content": example.prompt})
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, example: Example, template: str | None = None, system: str | None = None) -> list[int]:
    text = render_prompt(tokenizer, example, template, system)
    # A chat template writes its own special tokens (BOS included); a raw prompt gets the tokenizer's.
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, template))["input_ids"]


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """Answer tokens followed by EOS, so the model learns to stop."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss is on the completion only
    truncated: bool


def fit_prompt(prompt_ids: list[int], budget: int) -> list[int]:
    """Cut the middle of an over-long prompt: its start (instructions) and end (question) matter most."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = budget // 2
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]


def encode_example(tokenizer: Any, example: Example, max_len: int, template: str | None = None, system: str | None = None) -> Encoded:
    prompt_ids = encode_prompt(tokenizer, example, template, system)
    completion_ids = encode_completion(tokenizer, example.completion)
    truncated = len(prompt_ids) + len(completion_ids) > max_len
    if truncated:
        completion_ids = completion_ids[: max(1, max_len // 2)] if len(completion_ids) > max_len // 2 else completion_ids
        prompt_ids = fit_prompt(prompt_ids, max_len - len(completion_ids))
    return Encoded(
        input_ids=prompt_ids + completion_ids,
        labels=[-100] * len(prompt_ids) + completion_ids,
        truncated=truncated,
    )
