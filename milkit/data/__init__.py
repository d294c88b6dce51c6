"""Cohorts: labels tables, bag datasets, batching, samplers, splits, provenance, MIL benchmarks.

The names below are importable from ``milkit.data`` directly (loaded on first use, so that
importing a light submodule such as ``milkit.data.label_cells`` does not import torch).
"""

from __future__ import annotations

from milkit import lazy_exports

_EXPORTS = {
    "LabelTable": "labels",
    "load_labels": "labels",
    "BagDataset": "datasets",
    "InMemoryBagDataset": "datasets",
    "collate_bags": "collate",
    "balanced_sampler": "sampling",
    "balanced_weights": "sampling",
    "class_weights": "sampling",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("milkit.data", _EXPORTS)
