"""Run an order-sensitive sequence module on each bag of a padded batch at its own length.

Recurrent (Mamba) and region-partitioning (R2T) encoders cannot simply ignore padding: padding
would enter the scan state or shift the region grid. ``apply_per_bag`` gathers the real instances
of each bag (in their original order), groups bags of equal length into one call, and scatters the
results back, so a padded batch gives exactly the per-bag results.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def apply_per_bag(fn: Callable[[Tensor], Tensor], x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply ``fn: (b, n, D) -> (b, n, E)`` to the real instances of each bag.

    Args:
        fn: sequence module for unpadded bags of one common length.
        x: (B, N, D) padded batch.
        mask: (B, N) bool, True = real instance, or None (no padding).

    Returns:
        (B, N, E); padded positions are 0.
    """
    if mask is None or bool(mask.all()):
        return fn(x)
    counts = mask.sum(dim=1)
    out: Tensor | None = None
    for length in torch.unique(counts).tolist():
        rows = (counts == length).nonzero().flatten()
        pos = mask[rows].nonzero()[:, 1].view(len(rows), length)  # kept order within each bag
        gathered = x[rows[:, None], pos]  # (b, length, D)
        res = fn(gathered)
        if out is None:
            out = res.new_zeros(x.shape[0], x.shape[1], res.shape[-1])
        out = out.index_put((rows[:, None].expand_as(pos), pos), res)
    assert out is not None  # counts is non-empty because N >= 1 (checked by check_bag_input)
    return out
