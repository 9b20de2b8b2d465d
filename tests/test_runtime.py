"""Threads and device are decided in one place, with a clear error for a device that is not there."""

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
