"""Import a user's function named in the config as ``module.function`` (or ``module:function``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

from affinage.errors import ConfigError


def import_user_function(path: str, base_dir: str, where: str, builtins: list[str]) -> Callable:
    """The function ``path`` names; a module next to the config file is importable."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ConfigError(f"'{path}' is neither a built-in ({', '.join(builtins)}) nor module.function", where=where,
                          fix="write a built-in name or a dotted path such as my_module.my_function")
    added = str(Path(base_dir).resolve())
    sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import '{module_name}' for '{path}': {error}", where=where,
                          fix="put the module next to the config file or on PYTHONPATH") from None
    finally:
        sys.path.remove(added)
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"'{attr}' in module '{module_name}' is not a function", where=where)
    return function
