"""Class balance: per-bag weights, a balanced sampler and loss class weights (one rule for all).

Balanced means each class is drawn with equal total probability: a bag weighs 1 / (count of its
class), as CLAM's ``make_weights_for_balanced_classes_split``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from milkit.errors import MilkitError


def _label_counts(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(labels, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise MilkitError("labels must be a non-empty 1-D sequence", value=arr.shape)
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        raise MilkitError(
            f"labels must be class indices in [0, {num_classes})",
            value=(int(arr.min()), int(arr.max())),
        )
    return np.bincount(arr, minlength=num_classes or 0)


def balanced_weights(labels: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Per-bag weights 1 / (count of its class), float64: every class has total weight 1, so
    sampling with replacement draws each class equally often (``--balanced``).

    Raises:
        MilkitError: labels that are not a non-empty 1-D sequence of class indices >= 0.
    """
    arr = np.asarray(labels, dtype=np.int64)
    counts = _label_counts(arr)
    return torch.as_tensor(1.0 / counts[arr], dtype=torch.double)


def balanced_sampler(
    labels: Sequence[int] | np.ndarray,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """Sampler drawing every class equally often (with replacement, ``num_samples`` per epoch).

    Each bag is weighted by :func:`balanced_weights`. The Trainer draws with the same weights
    through ``milkit.runtime.distributed.EpochSampler`` (epoch-seeded, sharded over DDP ranks).
    """
    weights = balanced_weights(labels)
    return WeightedRandomSampler(
        weights,
        num_samples=len(weights) if num_samples is None else int(num_samples),
        replacement=True,
        generator=generator,
    )


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights n / (C * n_c) (scikit-learn's "balanced").

    A class absent from ``labels`` gets weight 0 (it never appears as a target, so its weight has
    no effect; 0 avoids an infinity).
    """
    counts = _label_counts(labels, num_classes).astype(np.float64)
    total = counts.sum()
    weights = np.where(counts > 0, total / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)
