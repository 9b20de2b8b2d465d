"""Ludwig's ``prompt`` block: ``task``, the ``{__task__}``/``{__sample__}`` keywords and ``retrieval``.

Ludwig builds a zero-shot prompt from ``prompt.task`` when there is no template, with its own
default template (``ludwig/data/prompt.py``, the same in v0.10 and 0.17): the sample, then the
task, then ``ASSISTANT:``. affinage writes that template as a literal one, the task filled in
and ``{__sample__}`` pointing at the input feature's column, so the rows are rendered as Ludwig
renders them and the same text is asked at inference.
"""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError
from affinage.ludwig.common import refuse

# Ludwig's DEFAULT_ZERO_SHOT_PROMPT_TEMPLATE, the prompt it writes for a task without a template.
ZERO_SHOT_TEMPLATE = "SAMPLE INPUT: {__sample__}\n\nUSER: Complete the following task: {__task__}\n\nASSISTANT:\n"
SAMPLE, TASK = "{__sample__}", "{__task__}"


def translate_prompt(raw: dict[str, Any]) -> None:
    """Rewrite ``prompt.task`` and Ludwig's keywords into a literal affinage template."""
    prompt = raw.get("prompt")
    if not isinstance(prompt, dict):
        return
    _retrieval(prompt.pop("retrieval", None))
    task = prompt.pop("task", None)
    template = prompt.get("template")
    if task is not None and not template:
        template = ZERO_SHOT_TEMPLATE
    if not isinstance(template, str):
        return
    if TASK in template:
        if task is None:
            raise ConfigError(
                "prompt.template uses {__task__} but prompt.task is not set",
                where="prompt.template",
                fix="add prompt.task (the instruction written where {__task__} stands), or remove {__task__}",
            )
        template = template.replace(TASK, str(task).replace("{", "{{").replace("}", "}}"))
    elif task is not None:
        raise ConfigError(
            "prompt.task is set but prompt.template has no {__task__} to write it in",
            where="prompt.task",
            fix="put {__task__} in the template where the task goes (as Ludwig requires), or remove prompt.task",
        )
    if SAMPLE in template:
        template = template.replace(SAMPLE, "{" + _input_column(raw) + "}")
    prompt["template"] = template


def _input_column(raw: dict[str, Any]) -> str:
    """The data column Ludwig's ``{__sample__}`` stands for: the first input feature's."""
    features = raw.get("input_features")
    if isinstance(features, list) and features and isinstance(features[0], dict):
        column = features[0].get("column") or features[0].get("name")
        if column:
            return str(column)
    raise ConfigError(
        "the prompt uses {__sample__} (the input sample) but no input feature names its column",
        where="prompt",
        fix="add input_features: [{name: COLUMN, type: text}] naming the data column of the input",
    )


def _retrieval(retrieval: Any) -> None:
    """Only "no retrieval" (absent, null, or ``type: null``) is accepted."""
    if retrieval is None or (isinstance(retrieval, dict) and retrieval.get("type") is None):
        return
    kind = retrieval.get("type") if isinstance(retrieval, dict) else retrieval
    raise refuse(
        f"prompt.retrieval.type: {kind}",
        "few-shot prompts from training rows retrieved by embedding similarity",
        "remove prompt.retrieval (or set type: null); to show the model examples, write them into prompt.template",
    )
