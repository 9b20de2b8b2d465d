"""The declarative config: one YAML file describes a whole fine-tuning run.

It reads like Ludwig's LLM config (seed 000): ``base_model``, ``quantization``, ``adapter``,
``prompt``, ``input_features``/``output_features`` and ``trainer``. Every default of the
project lives here and nowhere else; each field's description doubles as documentation
(``affinage config --help`` prints them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from affinage.config_sections import (
    AdapterConfig,
    DataConfig,
    EvalConfig,
    FeatureConfig,
    GenerationConfig,
    PromptConfig,
    QuantizationConfig,
    SchedulerConfig,
    SplitConfig,
    TrainerConfig,
    TransformConfig,
    _Section,
)
from affinage.errors import ConfigError
from affinage.ludwig import translate_ludwig

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"

__all__ = [  # the sections are defined in config_sections and read from here
    "AdapterConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "FeatureConfig",
    "GenerationConfig",
    "PromptConfig",
    "QuantizationConfig",
    "SchedulerConfig",
    "SplitConfig",
    "TrainerConfig",
    "TransformConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "load_config",
]


class Config(_Section):
    model_type: Literal["llm"] = "llm"
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="'smollm2-135m-instruct' (embedded), 'gemma3-270m', a .gguf path, a local HF directory or a Hub "
        "id.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the Hub. Off unless you trust it.")
    quantization: QuantizationConfig | None = Field(None, description="Load the base model quantized (QLoRA).")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    input_features: list[FeatureConfig] | None = Field(None, description="None: detected from the data format.")
    output_features: list[FeatureConfig] | None = Field(None, description="None: detected from the data format.")
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    preprocessing: dict[str, Any] = Field(
        default_factory=dict,
        description="Ludwig's sample_ratio or sample_size: train on a seeded sample of the training rows "
        "(its other keys are translated: docs/ludwig.md).",
    )
    backend: dict[str, Any] | None = Field(None, description="Ludwig compatibility; ignored.")
    ludwig_version: str | None = Field(None, description="Ludwig compatibility; ignored.")

    # Directory the config file lives in: relative data paths are resolved against it.
    base_dir: str = Field(".", exclude=True)

    @model_validator(mode="after")
    def _read_json_schema(self) -> Config:
        # A json_schema file is read now: the run directory keeps the config, not the file beside it.
        if self.generation.constraint is not None:
            self.generation.constraint = self.generation.constraint.resolved(self.base_dir)
        return self

    def resolve_path(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (Path(self.base_dir) / candidate)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.sub=value`` into a key path and a YAML-typed value."""
    if "=" not in item:
        raise ConfigError(
            f"override '{item}' has no '='", fix="write --set key.subkey=value, e.g. --set trainer.epochs=2"
        )
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return [part for part in key.strip().split(".") if part], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section", fix="check the key path")
            node = child
        node[path[-1]] = value
    return raw


def _format_validation_error(error: ValidationError, source: str, overrides: list[str] | None = None) -> ConfigError:
    """One message for every invalid key or value, each named by its dotted path (and its --set, if any)."""
    lines, fixes = [], []
    for issue in error.errors():
        key = ".".join(str(part) for part in issue["loc"]) or "(top level)"
        origin = _override_of(key, overrides or [])
        origin = f" (from --set {origin})" if origin else ""
        if issue["type"] == "extra_forbidden":
            allowed = _allowed_keys(issue["loc"][:-1])
            close = difflib.get_close_matches(str(issue["loc"][-1]), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}'{origin}{hint}; allowed here: {', '.join(allowed)}")
            if close:
                fixes.append(f"rename '{key}' to '{'.'.join([*key.split('.')[:-1], close[0]])}'")
        else:
            lines.append(f"'{key}'{origin}: {issue['msg']} (got {issue.get('input')!r})")
    fixes.append("correct the key or value (`affinage config` lists every key with its default; see docs/config.md)")
    return ConfigError("; ".join(lines), where=source, fix="; ".join(fixes))


def _override_of(key: str, overrides: list[str]) -> str | None:
    """The last ``--set`` that wrote ``key``, a section above it or a key below it, for the error message."""
    found = None
    for item in overrides:
        path = ".".join(parse_override(item)[0])
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            found = item
    return found


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        inner = [
            a
            for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not inner:
            for arg in getattr(annotation, "__args__", ()):
                inner += [a for a in getattr(arg, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return sorted(name for name in model.model_fields if name != "base_dir")


def config_from_dict(
    raw: dict[str, Any], *, source: str = "config", base_dir: str | Path = ".", overrides: list[str] | None = None
) -> Config:
    """Validate a config mapping; ``overrides`` (the --set items applied to it) are named in errors."""
    try:
        config = Config.model_validate({**translate_ludwig(raw), "base_dir": str(base_dir)})
    except ValidationError as error:
        raise _format_validation_error(error, source, overrides) from None
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    path = Path(path)
    raw = _read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path), base_dir=path.parent, overrides=overrides)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The config file's mapping; a missing, binary or malformed file is a ConfigError naming it (and the line)."""
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}",
            fix="pass the path of a YAML config, e.g. examples/email-router/config.yaml",
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            "not a YAML config: the file is not UTF-8 text (a binary file?)",
            where=f"{path}:{line}",
            fix="pass the YAML config file, or re-save it as UTF-8",
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(
            f"invalid YAML: {getattr(error, 'problem', error)}", where=where, fix="fix the indentation or quoting"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            "the config must be a mapping of keys to values",
            where=str(path),
            fix="write one `key: value` per line, e.g. base_model: smollm2-135m-instruct",
        )
    return raw


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json", by_alias=False, exclude={"base_dir"})


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and description (for ``--help``)."""
    lines = []
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        annotation = field.annotation
        nested = [
            a
            for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if nested and nested[0] is not SchedulerConfig:
            lines += describe_fields(nested[0], f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{prefix}{name} (default {default!r}): {field.description or ''}")
    return lines
