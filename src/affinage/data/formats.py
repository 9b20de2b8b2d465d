"""Read data files and map their rows onto prompt/completion examples.

Three row formats are understood (the seeds use all of them):
- ``prompt`` / ``completion`` (seed 003, mlx-lm's completions format);
- Alpaca ``instruction`` / ``input`` / ``output`` (seeds 000 and 002);
- chat ``messages``: a list of ``{role, content}``; the last assistant turn is the completion.
``input_features`` / ``output_features`` in the config can name other columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affinage.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training/evaluation example, independent of the file format it came from."""

    prompt: str | None  # the user-side text (None for chat examples)
    completion: str
    messages: list[dict[str, str]] | None = None  # chat history before the completion
    row: dict[str, Any] = field(default_factory=dict)  # the original row, for templates
    source: str = ""  # "file:line", for error messages


def alpaca_prompt(instruction: str, extra: Any) -> str:
    """Alpaca's instruction and optional input as one user message."""
    extra = str(extra or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL (or JSON array) file with their 1-based line numbers."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", fix="check the path in the config's data section")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError("file is not valid UTF-8", where=f"{path}:{line}", fix="re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError("the file is empty", where=str(path), fix="add one JSON object per line")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"invalid JSON: {error.msg}", where=f"{path}:{error.lineno}", fix="fix the JSON syntax") from None
        if not isinstance(data, list):
            raise DataError("a .json data file must hold a list of objects", where=str(path))
        rows = list(enumerate(data, start=1))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"invalid JSON ({error.msg} at column {error.colno})",
                    where=f"{path}:{number}",
                    fix="each line must be one complete JSON object; escape quotes inside strings as \\\"",
                ) from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError("each row must be a JSON object", where=f"{path}:{number}", fix='write {"prompt": ..., "completion": ...}')
    return rows


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    return "unknown"


def _text_field(row: dict[str, Any], name: str, where: str, *, allow_empty: bool = False) -> str:
    if name not in row:
        present = ", ".join(sorted(row)) or "none"
        raise DataError(
            f"missing field '{name}' (fields present: {present})",
            where=where,
            fix=f"add '{name}' to every row, or set input_features/output_features to the column names",
        )
    value = row[name]
    if value is None:
        value = ""
    if not isinstance(value, (str, int, float)):
        raise DataError(f"field '{name}' must be text, got {type(value).__name__}", where=where)
    value = str(value)
    if not allow_empty and not value.strip():
        raise DataError(f"field '{name}' is empty", where=where, fix="fill it in or remove the row")
    return value


def _chat_example(row: dict[str, Any], where: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list", where=where, fix='write [{"role": "user", "content": ...}, ...]')
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(
                f"messages[{index}] must be {{role: system|user|assistant, content: text}}", where=where
            )
        clean.append({"role": message["role"], "content": message["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer", where=where, fix="end each conversation with an assistant turn")
    return Example(prompt=None, completion=clean[-1]["content"], messages=clean[:-1], row=row, source=where)


def row_to_example(row: dict[str, Any], where: str, *, input_field: str | None, output_field: str | None, templated: bool) -> Example:
    """Map one row to an Example; ``templated`` means the prompt text comes from a template."""
    kind = detect_format(row)
    if kind == "chat" and input_field is None:
        return _chat_example(row, where)
    if output_field is None:
        output_field = {"alpaca": "output", "completion": "completion"}.get(kind)
        if output_field is None:
            raise DataError(
                f"cannot tell the row's format (fields: {', '.join(sorted(row))})",
                where=where,
                fix="use prompt/completion, instruction/input/output or messages, or set input_features and output_features",
            )
    completion = _text_field(row, output_field, where)
    if templated:
        return Example(prompt=None, completion=completion, row=row, source=where)
    if input_field is None:
        if kind == "alpaca":
            prompt = alpaca_prompt(_text_field(row, "instruction", where), row.get("input"))
            return Example(prompt=prompt, completion=completion, row=row, source=where)
        input_field = "prompt"
    return Example(prompt=_text_field(row, input_field, where), completion=completion, row=row, source=where)


def load_examples(path: Path, *, input_field: str | None = None, output_field: str | None = None, templated: bool = False) -> list[Example]:
    rows = read_rows(path)
    return [
        row_to_example(row, f"{path}:{number}", input_field=input_field, output_field=output_field, templated=templated)
        for number, row in rows
    ]
