"""The schema of a decoding constraint (``generation.constraint``), apart so config.py stays small.

Ludwig spells it on the output feature (``decoder: {type: text_parser, regex: ...}``);
:mod:`affinage.ludwig` moves that here before the schema validates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConstraintConfig(BaseModel):
    """Exactly one of ``regex`` and ``json_schema``: what every generated answer must be."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    regex: str | None = Field(
        None,
        description="Every generated answer fully matches this regular expression, e.g. '(RH|Support|Finance)' or "
        "'[0-9]{3}-[A-Z]{2}' (no look-around or back-references). Ludwig: output_features[].decoder.regex.",
    )
    json_schema: dict[str, Any] | str | None = Field(
        None,
        description="Every generated answer is JSON valid against this schema: inline, or the path of a .json file "
        "(relative to the config; read when the config loads). Ludwig: output_features[].decoder.json_schema.",
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        """Checked by the engine that will run it (outlines-core's, Rust syntax) over the 256 bytes."""
        if value is None:
            return value
        from outlines_core import Index, Vocabulary

        try:
            Index(value, Vocabulary(0, {bytes([byte]): [byte + 1] for byte in range(256)}))
        except ValueError:
            try:
                re.compile(value)
                reason = "look-around and back-references are not supported"
            except re.error as error:
                reason = str(error)
            raise ValueError(f"not a regular expression for constrained decoding: {reason}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ConstraintConfig:
        if (self.regex is None) == (self.json_schema is None):
            raise ValueError("set exactly one of regex and json_schema")
        return self

    def resolved(self, base_dir: str | Path) -> ConstraintConfig:
        """The constraint with a json_schema given as JSON text or a file path read into a mapping."""
        if not isinstance(self.json_schema, str):
            return self
        text = self.json_schema.strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            path = path if path.is_absolute() else Path(base_dir) / path
            if not path.is_file():
                raise ValueError(f"json_schema: no such file {path} (give the schema inline or a .json file path)")
            text = path.read_text(encoding="utf-8")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"json_schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise ValueError('json_schema must be a JSON object (a schema such as {"type": "object", ...})')
        return self.model_copy(update={"json_schema": schema})
