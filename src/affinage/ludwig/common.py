"""What every section translator shares: the refusal message and moving a key to affinage's spelling."""

from __future__ import annotations

from typing import Any

from affinage.errors import ConfigError

# Values that leave a Ludwig setting at "off": accepted and dropped (the setting changes nothing).
OFF = (None, False, 0, 0.0, "none", "None", [], {})


def refuse(key: str, what: str, fix: str) -> ConfigError:
    """The one message for a Ludwig key affinage cannot honour: what it does, and what to use instead."""
    return ConfigError(f"Ludwig's `{key}` ({what}) is not supported by affinage", where=key, fix=fix)


def block(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """``raw[name]`` if it is a mapping (``raw`` is the translator's own deep copy), else None."""
    value = raw.get(name)
    return value if isinstance(value, dict) else None


def put(raw: dict[str, Any], where: str, value: Any, source: str) -> None:
    """Write ``value`` at the dotted ``where`` unless the config already says something else there."""
    *sections, key = where.split(".")
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {}
        node = node[section]
    if key in node and node[key] != value:
        raise ConfigError(
            f"`{source}` ({value!r}) and `{where}` ({node[key]!r}) disagree",
            where=source,
            fix=f"keep one of them (Ludwig's `{source}` is affinage's `{where}`)",
        )
    node[key] = value


def drop_if_off(section: dict[str, Any], prefix: str, keys: dict[str, str], fix: str, off: tuple = OFF) -> None:
    """Pop each of ``keys`` (name -> what it does); one set to a value other than off is refused."""
    for key, what in keys.items():
        if key in section:
            value = section.pop(key)
            if value not in off:
                raise refuse(f"{prefix}.{key}: {value}", what, fix)
