"""Atomic writes: the new bytes reach the disk before the rename, the rename before the call returns."""

import os

import pytest

from affinage.atomic import write_file_atomic, write_text_atomic


def test_the_file_then_its_directory_are_synced_and_no_temporary_is_left(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_open = os.fsync, os.open
    opened = {}

    def tracking_open(path, flags, *args):
        descriptor = real_open(path, flags, *args)
        opened[descriptor] = str(path)
        return descriptor

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(opened.get(fd)), real_fsync(fd)))
    target = tmp_path / "out" / "state.json"
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}" and os.listdir(target.parent) == ["state.json"]
    assert synced[-1] == str(target.parent) and synced[0].startswith(str(target.parent / ".state.json."))


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_file_atomic(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]
