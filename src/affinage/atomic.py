"""Atomic writes: a killed process leaves the old file (or nothing), never half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_file_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` fills a temporary file beside ``path``, which then replaces it.

    The file's bytes reach the disk before the rename and the rename before we return (fsync of
    the file, then of its directory): after a crash ``path`` is the old file or the new one, whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomic(path: Path, text: str) -> None:
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it becomes ``target``.

    Every file in it and the directory itself are synced before the rename, and the parent after
    it: after a crash ``target`` is the old directory or the new one with all its bytes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync(file)
        fsync(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
