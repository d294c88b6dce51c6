"""Batching bags of different lengths: pad to the longest with a mask (the batch format of
``milkit.models.base``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from milkit.errors import MilkitError

# --------------------------------------------------------------------------------------------
# Batching and class balance
# --------------------------------------------------------------------------------------------


def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of bag items into one batch (the batch format of ``models.base``).

    Returns ``features`` (B, N_max, D) zero-padded, ``mask`` (B, N_max) bool with True at real
    instances (None when B == 1: the unpadded exact-reproduction path), ``coords`` (B, N_max, 2)
    int64 or None (None unless every item has coords), ``label`` (B,) int64, ``slide_id`` list.
    """
    if len(items) == 0:
        raise MilkitError("cannot collate an empty batch", value=0)
    feats = [it["features"] for it in items]
    dims = {int(f.shape[1]) for f in feats}
    if len(dims) != 1:
        ids = [it["slide_id"] for it in items]
        raise MilkitError(
            f"bags in one batch have different feature dims {sorted(dims)}", value=ids
        )
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.int64)
    slide_ids = [str(it["slide_id"]) for it in items]
    has_coords = all(it.get("coords") is not None for it in items)
    if len(items) == 1:
        coords = items[0]["coords"].unsqueeze(0) if has_coords else None
        return {
            "features": feats[0].unsqueeze(0),
            "mask": None,
            "coords": coords,
            "label": labels,
            "slide_id": slide_ids,
        }
    b, d = len(items), dims.pop()
    n_max = max(int(f.shape[0]) for f in feats)
    features = feats[0].new_zeros((b, n_max, d))
    mask = torch.zeros((b, n_max), dtype=torch.bool)
    coords = torch.zeros((b, n_max, 2), dtype=torch.int64) if has_coords else None
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        features[i, :n] = it["features"]
        mask[i, :n] = True
        if coords is not None:
            coords[i, :n] = it["coords"]
    return {
        "features": features,
        "mask": mask,
        "coords": coords,
        "label": labels,
        "slide_id": slide_ids,
    }
