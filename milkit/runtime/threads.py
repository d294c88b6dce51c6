"""Torch intra-op threads chosen from the work size of one training or inference step.

Small bags (a few hundred instances) make each matrix product too small to split: with several
intra-op threads every operator pays a fork/join, and on a loaded machine one waiting thread stalls
the step. Measured on the 2-core development machine (ABMIL fwd + bwd + fused AdamW, batch 1):
7 × 230 features took 1.0 ms with one thread and 1.8 ms with two; 64 × 1024 took 3.8 vs 4.8 ms;
from about 256 × 1024 two threads win (11.7 vs 9.4 ms). The crossover is near 10^5 feature values
per step, so below ``SMALL_STEP_VALUES`` one thread is used; above it torch's own default (which
honours ``OMP_NUM_THREADS``) is kept. ``milkit demo`` and ``milkit train`` both choose this way;
``--threads N`` overrides.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from milkit.errors import MilkitError

# Feature values (instances × dims × bags) per step below which one intra-op thread is faster.
SMALL_STEP_VALUES = 2**17
_SAMPLE = 16  # bags looked at to estimate the typical bag size


@functools.lru_cache(maxsize=4096)
def _header_shape(path: str, mtime_ns: int) -> tuple[int, int]:
    """(instances, dim) from a bag file's header; cached per file version (every fold and every
    prediction of a run asks again)."""
    from milkit.io.bags import read_bag_header

    header = read_bag_header(path)
    return int(header.num_instances), int(header.dim)


def typical_bag_shape(dataset: Any) -> tuple[int, int] | None:
    """Median instances per bag and feature dim of up to 16 evenly spaced bags; None if unknown.

    Uses bag-file headers when the dataset has ``paths`` (``BagDataset``: no features are read),
    else the items' ``features`` (an in-memory dataset).
    """
    n = len(dataset)
    if n == 0:
        return None
    picks = np.unique(np.linspace(0, n - 1, num=min(n, _SAMPLE)).round().astype(int))
    sizes: list[int] = []
    dim = 0
    paths = getattr(dataset, "paths", None)
    for i in picks:
        if paths is not None and str(paths[i]).endswith((".h5", ".hdf5")):
            try:
                n_i, dim = _header_shape(str(paths[i]), os.stat(paths[i]).st_mtime_ns)
            except (MilkitError, OSError):
                continue
            sizes.append(n_i)
        else:
            bags = getattr(dataset, "bags", None)
            features = bags[i] if bags is not None else dataset[int(i)]["features"]
            sizes.append(int(features.shape[0]))
            dim = int(features.shape[1])
    if not sizes:
        return None
    return int(np.median(sizes)), dim


def choose_threads(requested: int | None, dataset: Any = None, *, batch_size: int = 1) -> int:
    """Intra-op threads for steps over ``dataset``: ``requested`` if given, else by work size.

    One thread when a step holds fewer than ``SMALL_STEP_VALUES`` feature values (median bag
    instances × dim × ``batch_size``); otherwise torch's current default. Never more than the
    current default unless ``requested`` asks for it.
    """
    if requested is not None:
        if int(requested) < 1:
            raise MilkitError("threads must be >= 1", value=requested)
        return int(requested)
    current = torch.get_num_threads()
    shape = typical_bag_shape(dataset) if dataset is not None else None
    if shape is not None and shape[0] * shape[1] * max(1, batch_size) < SMALL_STEP_VALUES:
        return 1
    return current


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)``; restore the previous value after."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


__all__ = ["SMALL_STEP_VALUES", "choose_threads", "intra_op_threads", "typical_bag_shape"]
