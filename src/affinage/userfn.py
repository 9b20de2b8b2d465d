"""A user's function named in the config as ``module.function`` (or ``module:function``).

Only a Python file in the config's own folder (``module.py``, or ``pkg/module.py`` for
``pkg.module.function``) is loaded, by path: a config (or a run directory someone shares) can
never name an installed callable such as ``os.system`` or ``builtins.exec`` and have it run on
the data. Runs keep a copy of the file, so ``eval``/``predict`` work from the run alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

from affinage.errors import ConfigError


def split_name(path: str) -> tuple[str, str]:
    module, _, attr = path.replace(":", ".").rpartition(".")
    return module, attr


def user_module_file(path: str, base_dir: str | Path) -> Path:
    module, _ = split_name(path)
    return Path(base_dir) / (module.replace(".", "/") + ".py")


def import_user_function(path: str, base_dir: str | Path, where: str, builtins: list[str]) -> Callable:
    """The function ``path`` names, from a .py file in ``base_dir``."""
    module_name, attr = split_name(path)
    if not module_name:
        raise ConfigError(
            f"'{path}' is neither a built-in ({', '.join(builtins)}) nor module.function",
            where=where,
            fix="write a built-in name or module.function with module.py next to the config file",
        )
    file = user_module_file(path, base_dir)
    if not file.is_file():
        raise ConfigError(
            f"cannot import '{module_name}' for '{path}': no {file}",
            where=where,
            fix=f"put {module_name.replace('.', '/')}.py next to the config file "
            "(installed modules are not loaded, for safety)",
        )
    unique = "affinage_user_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(unique, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(
            f"cannot import {file} for '{path}': {type(error).__name__}: {error}",
            where=where,
            fix=f"fix the error in {file.name} (run `python {file.name}` to see it)",
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(
            f"'{attr}' in {file} is not a function", where=where, fix=f"define `def {attr}(text): ...` in {file.name}"
        )
    return function


def positional_arity(function: Callable) -> int:
    """How many positional arguments ``function`` accepts (to call ``f(text)`` or ``f(text, rng)``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
