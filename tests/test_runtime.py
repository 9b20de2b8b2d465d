"""Threads and device are decided in one place, with a clear error for a device that is not there."""

import os
from pathlib import Path

import pytest
import torch

from affinage.errors import AffinageError
from affinage.runtime import pick_device, set_threads


def test_threads_follow_affinage_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("AFFINAGE_THREADS", "1")
    try:
        assert set_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_defaults_to_cuda_when_present_and_names_a_missing_one():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(AffinageError, match="--device"):
        pick_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(AffinageError, match="no GPU"):
            pick_device("cuda")


def test_trim_heap_gives_freed_small_allocations_back(monkeypatch):
    """glibc keeps freed heap resident; malloc_trim(0) returns it (the measured cause of a run's RSS growth)."""
    import ctypes

    from affinage.runtime import trim_heap

    def rss_mb() -> float:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(4000)]  # 250 MB of 64 KiB pieces: below the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:  # the last one keeps the heap's top in use, so free() alone cannot shrink it
        libc.free(block)
    before = rss_mb()
    assert trim_heap()
    assert before - rss_mb() > 150
    libc.free(blocks[-1])


def test_heap_trim_listener_trims_every_n_steps(monkeypatch):
    from affinage.training import listeners
    from affinage.training.state import TrainState

    calls = []
    monkeypatch.setattr(listeners, "trim_heap", lambda: calls.append(1) or True)
    trim, state = listeners.HeapTrim(every=10), TrainState()
    for step in range(1, 31):
        state.step = step
        trim.on_step_end(state, None)
    assert len(calls) == 3


def test_frozen_objects_leaves_what_was_alive_out_of_collections_and_thaws_it():
    import gc
    import weakref

    from affinage.runtime import frozen_objects

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with frozen_objects() as froze:
        assert froze and gc.get_freeze_count() > 0  # what was alive is frozen
        cycle = Node()
        cycle.self = cycle  # garbage made inside is still collected
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None
    assert gc.get_freeze_count() == 0


def test_frozen_objects_inside_another_freeze_leaves_it_as_it_was():
    import gc

    from affinage.runtime import frozen_objects

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_objects() as froze:
            assert not froze
        assert gc.get_freeze_count() == frozen  # not thawed by the inner block
    finally:
        gc.unfreeze()
