"""User-facing errors: the CLI prints these without a traceback.

Every error raised for bad input says *where* (file, line, key) and *how to fix it*, so a
user never has to read affinage's source to understand what went wrong.
"""

from __future__ import annotations


class AffinageError(Exception):
    """An error caused by the user's input (config, data, model name), not by a bug."""

    def __init__(self, message: str, *, fix: str | None = None, where: str | None = None):
        self.where = where
        self.fix = fix
        text = f"{where}: {message}" if where else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class ConfigError(AffinageError):
    """The YAML config or a --set override is invalid."""


class DataError(AffinageError):
    """A data file is malformed or does not match the config."""


class ModelNotFoundError(AffinageError):
    """The base model cannot be found locally (and the Hub cannot be reached)."""


class TrainingStopped(AffinageError):
    """Training stopped before its end on purpose (a signal, too many non-finite steps); its checkpoint resumes it.

    ``exit_code`` is what the CLI exits with: 128 + the signal's number for a signal, as a shell reports it.
    """

    def __init__(self, message: str, *, fix: str | None = None, exit_code: int = 1):
        super().__init__(message, fix=fix)
        self.exit_code = exit_code
