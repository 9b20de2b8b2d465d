"""Where and how fast this process computes: CPU threads and the device, decided once.

The CLI and the Python API call :func:`setup` once per process; library code receives the
device it should use and never picks one itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from affinage import distributed
from affinage.errors import AffinageError


def set_threads() -> int:
    """Use every core (PyTorch's default can leave one idle inside containers), or AFFINAGE_THREADS.

    Two torch processes sharing the cores must split them (e.g. AFFINAGE_THREADS=1 each on 2
    cores): oversubscribed OpenMP threads spin against each other and run many times slower. The
    processes torchrun starts on one machine split its cores evenly.
    """
    wanted = os.environ.get("AFFINAGE_THREADS")
    cores = len(os.sched_getaffinity(0))
    threads = int(wanted) if wanted else max(1, cores // distributed.local_processes())
    torch.set_num_threads(threads)
    return threads


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` (``cpu``, ``cuda``, ``cuda:1``), else CUDA when present, else the CPU."""
    if not requested or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise AffinageError(f"unknown device '{requested}'", where="--device", fix="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AffinageError("CUDA was asked for but this PyTorch sees no GPU", where="--device", fix="use --device cpu")
    return device


def setup(requested_device: str | None = None) -> torch.device:
    """Threads set, device chosen, and under torchrun the process group joined (each rank its own GPU):
    the one call a process makes before computing."""
    set_threads()
    return distributed.init(pick_device(requested_device))


def machine_memory_bytes() -> int:
    """The machine's physical memory: what shares of memory (the frozen-prefix cache, a forward's
    activations) are decided against, the same on every run of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_mb() -> float:
    """This program's resident-memory high-water mark, in MB.

    Linux's ``VmHWM`` (``/proc/self/status``), not ``ru_maxrss``: ``ru_maxrss`` survives ``exec``, so a
    process started from a big one (a pytest session, a notebook) reports its parent's size as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _libc_trim() -> object | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc keeps what a step freed: RSS grows over a run).

    Measured on the email router (80 steps): every 10 steps -252 MB of peak at no speed cost; every
    step costs 25 % (the next step faults the pages back in). Returns False where there is nothing to call.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@contextmanager
def frozen_objects() -> Iterator[bool]:
    """Within the block, Python's collector ignores the objects alive when it starts; yields whether it froze.

    Why: a full collection walks every tracked object, and a loaded model, its tokenizer and the
    planned rows are ~400,000 of them (SmolLM2): 214 ms each time, about every third 4 x 512-token
    step, ~1 % of training spent walking objects that live through it. Frozen, a collection walks
    only what the steps made. Reference counting still frees everything as before; a cycle among
    the frozen objects (garbage from before training included) waits for the block's end. Inside
    an outer freeze (another library's) it does nothing, so it never thaws what it did not freeze."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield False
        return
    gc.freeze()  # not after a collect: in a big process (a notebook, a test session) that would take seconds
    try:
        yield True
    finally:
        gc.unfreeze()
