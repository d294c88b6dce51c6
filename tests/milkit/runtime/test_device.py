"""milkit.runtime.device.resolve_device: the one reading of ``--device`` (extraction and training)."""

from __future__ import annotations

import pytest
import torch

from milkit.errors import MilkitError
from milkit.runtime.device import resolve_device


def test_auto_is_the_rank_gpu_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_auto_without_cuda_is_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(MilkitError, match="CUDA device requested but CUDA is not available"):
        resolve_device("cuda:0")


def test_a_torch_device_passes_and_nonsense_is_named():
    dev = torch.device("cpu")
    assert resolve_device(dev) is dev
    with pytest.raises(MilkitError, match=r"unknown device.*gpu0.*auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
