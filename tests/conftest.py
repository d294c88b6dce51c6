"""Shared fixtures: paths to the read-only test data beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SLIDES = SHARED_DATA / "slides"
MIL_BENCHMARKS = SHARED_DATA / "mil_benchmarks"

# Tests use tiny tensors: one intra-op thread per process avoids oversubscription, and
# `make test` runs two pytest workers (pytest-xdist) to use both cores of a CI machine.
torch.set_num_threads(1)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return _need(SLIDES)


@pytest.fixture(scope="session")
def mil_benchmarks_dir() -> Path:
    return _need(MIL_BENCHMARKS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
