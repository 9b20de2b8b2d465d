"""Read data files and map their rows onto prompt/completion examples.

Files: JSONL, JSON (a list of objects), CSV/TSV (a header row) and Parquet. Row formats (the
seeds use the first three; one file holds one format):
- ``prompt`` / ``completion`` (seed 003, mlx-lm's completions format);
- Alpaca ``instruction`` / ``input`` / ``output`` (seeds 000 and 002);
- chat ``messages``: a list of ``{role, content}``; the last assistant turn is the completion,
  earlier assistant turns are trained on too (see :func:`affinage.data.template.encode_example`);
- ``text`` alone: plain text for continued pre-training (no template, loss on every token).
``input_features`` / ``output_features`` in the config can name other columns.
"""

from __future__ import annotations

import csv
import io
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
    kind: str = ""  # "text": plain text (prompt "", the text is the completion), trained on every token
    original_row: dict[str, Any] | None = None  # the row as read, when a transform rewrote ``row``

    def identity_text(self) -> str:
        """What makes two examples 'the same' (leakage, duplicates): the prompt side, e.g. the email."""
        if self.kind == "text":
            return self.completion  # plain text has no prompt side
        if self.prompt is not None:
            return self.prompt
        if self.messages:
            return " ".join(m["content"] for m in self.messages if m["role"] != "assistant")
        return " ".join(str(v) for k, v in sorted(self.row.items()) if isinstance(v, str) and v != self.completion)


def alpaca_prompt(instruction: str, extra: Any) -> str:
    """Alpaca's instruction and optional input as one user message."""
    extra = str(extra or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


FORMATS = {
    "completion": "prompt/completion",
    "alpaca": "Alpaca (instruction/input/output)",
    "chat": "chat (messages)",
    "text": "plain text (text)",
}


def read_rows(path: Path) -> list[tuple[int | str, dict[str, Any]]]:
    """Rows of a data file with where they are: the 1-based line number (JSONL, CSV, whose header
    is line 1), the 1-based item number (JSON array) or ``"row N"`` (Parquet, 0-based as pandas shows it).
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}", fix="check the path in the config's data section")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            line = path.read_bytes()[: error.start].count(b"\n") + 1
            raise DataError(
                "file is not valid UTF-8", where=f"{path}:{line}", fix="re-save the file as UTF-8"
            ) from None
        text = text.removeprefix("\ufeff")  # a byte-order mark (Excel, Notepad) is not data
        if not text.strip():
            tabular = suffix in (".csv", ".tsv")
            raise DataError(
                "the file is empty",
                where=str(path),
                fix="add a header row and one row per example" if tabular else "add one JSON object per line",
            )
        if suffix in (".csv", ".tsv"):
            rows = _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".json":
            rows = _read_json(path, text)
        else:
            rows = _read_jsonl(path, text)
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(
                "each row must be a JSON object",
                where=f"{path}:{number}",
                fix='write {"prompt": ..., "completion": ...}',
            )
    return rows


def _read_json(path: Path, text: str) -> list[tuple[int | str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"invalid JSON: {error.msg}", where=f"{path}:{error.lineno}", fix="fix the JSON syntax"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            "a .json data file must hold a list of objects",
            where=str(path),
            fix='write [{"prompt": ..., "completion": ...}, ...], or use JSONL: one object per line',
        )
    return list(enumerate(data, start=1))


def _read_jsonl(path: Path, text: str) -> list[tuple[int | str, Any]]:
    rows: list[tuple[int | str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"invalid JSON ({error.msg} at column {error.colno})",
                where=f"{path}:{number}",
                fix='each line must be one complete JSON object; escape quotes inside strings as \\"',
            ) from None
    return rows


def _tabular_messages(row: dict[str, Any], where: str) -> None:
    """A ``messages`` cell of a CSV (or a Parquet string column) holds the conversation as JSON."""
    value = row.get("messages")
    if isinstance(value, str) and value.strip():
        try:
            row["messages"] = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(
                f"the 'messages' cell is not valid JSON ({error.msg} at column {error.colno})",
                where=where,
                fix='write the conversation as a JSON list: [{"role": "user", "content": ...}, ...]',
            ) from None


def _read_csv(path: Path, text: str, delimiter: str) -> list[tuple[int | str, Any]]:
    """CSV rows keyed by the header; a row's number is the file line it starts on (the header is line 1)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int | str, Any]] = []
    try:
        header = [name.strip() for name in next(reader)]
        seen: set[str] = set()
        for name in header:
            if name and name in seen:
                raise DataError(
                    f"column '{name}' appears twice in the header",
                    where=f"{path}:1",
                    fix="give every column its own name",
                )
            seen.add(name)
        if not seen - {""}:
            raise DataError(
                "the header row names no column",
                where=f"{path}:1",
                fix="start the file with a header such as prompt,completion",
            )
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue  # a blank line, or a row of empty cells (spreadsheets export those)
            if len(record) != len(header):
                raise DataError(
                    f"the row has {len(record)} fields but the header has {len(header)}",
                    where=f"{path}:{start}",
                    fix='quote fields that hold a comma, a quote or a line break ("like, this"; '
                    'a quote inside is written "")',
                )
            row = {
                name: value for name, value in zip(header, record) if name
            }  # an unnamed column is a spreadsheet index
            _tabular_messages(row, f"{path}:{start}")
            rows.append((start, row))
    except csv.Error as error:
        raise DataError(
            f"invalid CSV: {error}", where=f"{path}:{reader.line_num}", fix="check the quoting of this line"
        ) from None
    if not rows:
        raise DataError(
            "the file has a header but no rows", where=str(path), fix="add one row per example under the header"
        )
    return rows


def _read_parquet(path: Path) -> list[tuple[int | str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow", where=str(path), fix="pip install pyarrow") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        raise DataError(
            f"not a readable Parquet file ({error})",
            where=str(path),
            fix="re-export it as Parquet, or use JSONL or CSV",
        ) from None
    if not records:
        raise DataError("the file is empty", where=str(path), fix="add rows to the table")
    rows: list[tuple[int | str, Any]] = []
    for index, record in enumerate(records):
        _tabular_messages(record, f"{path}:row {index}")
        rows.append((f"row {index}", record))
    return rows


def detect_format(row: dict[str, Any]) -> str:
    """chat, alpaca, completion, text or unknown. Filled fields decide first, so that a CSV or
    Parquet file with every format's columns tells its rows apart; present-but-empty ones next."""
    filled = {
        key for key, value in row.items() if value is not None and not (isinstance(value, str) and not value.strip())
    }
    for keys in (filled, set(row)):
        if "messages" in keys:
            return "chat"
        if "instruction" in keys:
            return "alpaca"
        if "prompt" in keys and "completion" in keys:
            return "completion"
        if "text" in keys:
            return "text"
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
        raise DataError(
            f"field '{name}' must be text, got {type(value).__name__} ({json.dumps(value, ensure_ascii=False)[:60]})",
            where=where,
            fix=f'write \'{name}\' as one JSON string, e.g. "{name}": "..."',
        )
    value = str(value)
    if not allow_empty and not value.strip():
        raise DataError(f"field '{name}' is empty", where=where, fix="fill it in or remove the row")
    return value


def _chat_example(row: dict[str, Any], where: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(
            "'messages' must be a non-empty list", where=where, fix='write [{"role": "user", "content": ...}, ...]'
        )
    clean = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"messages[{index}] must be {{role: system|user|assistant, content: text}}",
                where=where,
                fix='write each message as {"role": "user", "content": "..."}',
            )
        clean.append({"role": message["role"], "content": message["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError(
            "the last message must be the assistant's answer",
            where=where,
            fix="end each conversation with an assistant turn",
        )
    return Example(prompt=None, completion=clean[-1]["content"], messages=clean[:-1], row=row, source=where)


def row_to_example(
    row: dict[str, Any], where: str, *, input_field: str | None, output_field: str | None, templated: bool
) -> Example:
    """Map one row to an Example; ``templated`` means the prompt text comes from a template."""
    kind = detect_format(row)
    if kind == "chat" and input_field is None:
        return _chat_example(row, where)
    if kind == "text" and input_field is None and output_field is None:
        return Example(prompt="", completion=_text_field(row, "text", where), row=row, source=where, kind="text")
    if output_field is None:
        output_field = {"alpaca": "output", "completion": "completion"}.get(kind)
        if output_field is None:
            raise DataError(
                f"cannot tell the row's format (fields: {', '.join(sorted(row))})",
                where=where,
                fix="use prompt/completion, instruction/input/output, messages or text, "
                "or set input_features and output_features",
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


def load_examples(
    path: Path, *, input_field: str | None = None, output_field: str | None = None, templated: bool = False
) -> list[Example]:
    """Every row as an Example; all rows of one file must share one format."""
    return examples_from_rows(
        read_rows(path), str(path), input_field=input_field, output_field=output_field, templated=templated
    )


def examples_from_rows(
    rows: list[tuple[int | str, dict[str, Any]]],
    label: str,
    *,
    input_field: str | None = None,
    output_field: str | None = None,
    templated: bool = False,
) -> list[Example]:
    """Rows read from ``label`` (a file, or a dataset reference such as ``hf://ID``) as Examples, one format."""
    examples = []
    first: tuple[str, int | str] | None = None  # the source's format and the row that set it
    for number, row in rows:
        where = f"{label}:{number}"
        examples.append(
            row_to_example(row, where, input_field=input_field, output_field=output_field, templated=templated)
        )
        kind = detect_format(row)
        if input_field is not None or kind == "unknown":
            continue  # configured columns decide, not the format
        if first is None:
            first = (kind, number)
        elif kind != first[0]:
            raise DataError(
                f"mixed formats: this row is {FORMATS[kind]} but {label}:{first[1]} is {FORMATS[first[0]]}",
                where=where,
                fix=f"use one format per file: rewrite this row as {FORMATS[first[0]]}, "
                f"or move the {FORMATS[kind]} rows to a file of their own",
            )
    return examples
