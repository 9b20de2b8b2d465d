"""Where affinage keeps what it builds once (converted and quantized models, the Go renderer).

A module of its own, below everything that caches, so that model loading, quantization and
export all find the same directory without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live; ``AFFINAGE_CACHE`` overrides."""
    root = os.environ.get("AFFINAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "affinage")
    return Path(root)
