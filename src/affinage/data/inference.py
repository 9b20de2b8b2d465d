"""A row or a bare text to answer, as an :class:`Example`: the one way inference reads input.

``predict``, ``BasicModelRunner``, ``compare`` and the export checks all read rows through
:func:`inference_example`, with the same rules as training's reader: a run's own input column,
a literal template's fields, chat ``messages``, Alpaca ``instruction``/``input`` (joined as
training joins them), or ``prompt``.
"""

from __future__ import annotations

from typing import Any

from affinage.config import Config
from affinage.data import feature_fields
from affinage.data.formats import Example, alpaca_prompt
from affinage.data.template import is_literal_template
from affinage.errors import DataError


def row_fields(config: Config) -> tuple[str | None, bool]:
    """The run's prompt column (input_features) and whether a literal template fills from rows."""
    return feature_fields(config)[0], is_literal_template(config.prompt.template)


def inference_example(
    item: str | dict[str, Any], where: str = "", *, input_field: str | None = None, templated: bool = False
) -> Example:
    """A bare string or a data row as an example to answer (its completion is empty)."""
    if isinstance(item, str):
        row = {"prompt": item, **({input_field: item} if input_field else {})}
        return Example(prompt=item, completion="", row=row, source=where)
    if templated:
        return Example(prompt=None, completion="", row=item, source=where)  # the template is filled from the row
    if input_field and input_field in item:
        return Example(prompt=str(item[input_field]), completion="", row=item, source=where)
    if "messages" in item:
        messages = list(item["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # predict the final answer, not the one already given
        return Example(prompt=None, completion="", messages=messages, row=item, source=where)
    if "instruction" in item:
        prompt = alpaca_prompt(str(item["instruction"]), item.get("input"))
        return Example(prompt=prompt, completion="", row=item, source=where)
    if "prompt" in item:
        return Example(prompt=str(item["prompt"]), completion="", row=item, source=where)
    raise DataError(
        f"row has none of prompt, instruction, messages (fields: {', '.join(sorted(item))})",
        where=where,
        fix="give each row a 'prompt' field",
    )


def question_text(example: Example) -> str:
    """What was asked, for people to read: the prompt, or the last user message."""
    if example.prompt is not None:
        return example.prompt
    users = [m.get("content", "") for m in example.messages or [] if m.get("role") == "user"]
    return users[-1] if users else next((str(v) for v in example.row.values() if isinstance(v, str)), "")
