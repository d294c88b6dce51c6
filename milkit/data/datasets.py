"""Bag datasets: one slide (bag) per item, read lazily from disk or held in memory.

Item: ``{"features": float32 (N, D), "coords": int64 (N, 2) | None, "label": int,
"slide_id": str}``; ``milkit.data.collate.collate_bags`` pads a batch of items with a mask.
Training-time augmentation (instance subsampling, feature dropout) is seeded per item.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from milkit.data.labels import LabelTable
from milkit.errors import MilkitError
from milkit.io.bags import read_bag_arrays

# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _AugmentMixin:
    """Training-time augmentations shared by the bag datasets.

    Off by default; ``train(True)`` switches them on. Instance subsampling keeps the chosen rows in
    their original (raster) order, since order-sensitive models (R2T, MambaMIL, TransMIL) depend
    on it. Feature dropout zeroes single feature values with probability p and rescales the rest
    by 1 / (1 - p) (inverted dropout, as ``torch.nn.functional.dropout``), so evaluation needs no
    correction.
    """

    max_instances: int | None
    eval_max_instances: int | None
    feature_dropout: float
    seed: int
    training: bool

    def _init_augment(
        self,
        max_instances: int | None,
        feature_dropout: float,
        seed: int,
        eval_max_instances: int | None = None,
    ) -> None:
        for name, value in (("max_instances", max_instances),
                            ("eval_max_instances", eval_max_instances)):  # fmt: skip
            if value is not None and value < 1:
                raise MilkitError(f"{name} must be a positive integer", value=value)
        self.eval_max_instances = eval_max_instances
        if not 0.0 <= feature_dropout < 1.0:
            raise MilkitError("feature_dropout must be in [0, 1)", value=feature_dropout)
        self.max_instances = max_instances
        self.feature_dropout = float(feature_dropout)
        self.seed = int(seed)
        self.training = False
        self._epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, ...] | None = None

    def train(self, mode: bool = True) -> Any:
        """Switch augmentations on (``True``) or off; returns the dataset."""
        self.training = bool(mode)
        return self

    def eval(self) -> Any:
        return self.train(False)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentations for ``epoch`` (reproducible runs, also across resumes)."""
        self._epoch = int(epoch)
        self._rng = None

    def _generator(self) -> np.random.Generator:
        # A DataLoader worker gets a fresh per-epoch seed from torch (worker_info.seed), derived
        # from the loader's generator, so worker runs stay reproducible under a fixed torch seed.
        info = torch.utils.data.get_worker_info()
        key = (self.seed, self._epoch) if info is None else (self.seed, self._epoch, info.seed)
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng(key)
            self._rng_key = key
        return self._rng

    def _eval_cap(
        self, features: torch.Tensor, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outside training, keep ``eval_max_instances`` evenly spaced instances of a larger bag.

        Deterministic (no RNG: the same tiles every epoch and every run) and spread over the
        whole slide in raster order; an approximation chosen by the user to fit memory
        (``--eval-max-instances``, ``milkit predict --max-instances``).
        """
        cap, n = self.eval_max_instances, features.shape[0]
        if cap is None or n <= cap:
            return features, coords
        idx = torch.from_numpy(np.linspace(0, n - 1, cap).round().astype(np.int64))
        return features.index_select(0, idx), None if coords is None else coords.index_select(
            0, idx
        )

    def _augment(
        self, features: torch.Tensor, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training:
            return self._eval_cap(features, coords)
        rng = None
        n = features.shape[0]
        if self.max_instances is not None and n > self.max_instances:
            rng = self._generator()
            keep = np.sort(rng.choice(n, size=self.max_instances, replace=False))
            idx = torch.from_numpy(keep)
            features = features.index_select(0, idx)
            coords = None if coords is None else coords.index_select(0, idx)
        if self.feature_dropout > 0.0:
            rng = rng or self._generator()
            p = self.feature_dropout
            keep_mask = rng.random(tuple(features.shape), dtype=np.float32) >= p
            features = features * torch.from_numpy(keep_mask).to(features.dtype) / (1.0 - p)
        return features, coords


def _item(features: torch.Tensor, coords: torch.Tensor | None, label: int, sid: str) -> dict:
    return {"features": features, "coords": coords, "label": int(label), "slide_id": sid}


class BagDataset(_AugmentMixin, Dataset):
    """Bags read lazily from disk, one slide per item.

    Item: ``{"features": float32 (N, D), "coords": int64 (N, 2) | None, "label": int,
    "slide_id": str}``. Files are opened per item (safe with DataLoader workers, which must not
    share HDF5 handles). ``cache=True`` keeps loaded bags in memory (per process: with DataLoader
    workers it pays off only with ``persistent_workers=True``; otherwise use ``num_workers=0``).

    Args:
        paths: bag files (``.h5``/``.hdf5`` or legacy ``.pt``).
        labels: integer labels, one per path; None gives -1 (prediction without labels).
        slide_ids: names; default from the file names.
        cache: keep loaded bags in memory.
        max_instances: in training mode, subsample larger bags to this many instances.
        eval_max_instances: outside training mode, keep this many evenly spaced instances of
            larger bags (an approximation to fit memory; default: whole bags).
        feature_dropout: in training mode, drop feature values with this probability.
        load_coords: read ``coords`` (needed by coordinate-aware models and heatmaps).
        seed: seed of the augmentations.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | np.ndarray | None = None,
        slide_ids: Sequence[str] | None = None,
        *,
        cache: bool = False,
        max_instances: int | None = None,
        eval_max_instances: int | None = None,
        feature_dropout: float = 0.0,
        load_coords: bool = True,
        seed: int = 0,
    ) -> None:
        from milkit.io.bags import slide_id_from_path

        self.paths = [Path(p) for p in paths]
        n = len(self.paths)
        self.labels = _as_labels(labels, n)
        self.slide_ids = (
            [slide_id_from_path(p) for p in self.paths]
            if slide_ids is None
            else [str(s) for s in slide_ids]
        )
        if len(self.slide_ids) != n:
            raise MilkitError(
                f"got {n} bag paths but {len(self.slide_ids)} slide ids", value=len(self.slide_ids)
            )
        self.cache = bool(cache)
        self.load_coords = bool(load_coords)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._init_augment(max_instances, feature_dropout, seed, eval_max_instances)

    @classmethod
    def from_table(
        cls, table: LabelTable, slide_ids: Sequence[str] | None = None, **kwargs: Any
    ) -> BagDataset:
        """The bags of ``table`` (or of ``slide_ids`` from it, in that order) with their labels."""
        sub = table if slide_ids is None else table.subset(slide_ids)
        frame = sub.frame
        return cls(
            frame["bag_path"].tolist(),
            frame["label_idx"].to_numpy(dtype=np.int64),
            frame["slide_id"].tolist(),
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (float32) and coords of bag ``index``, without augmentation."""
        if index in self._cache:
            return self._cache[index]
        feats, crd = read_bag_arrays(self.paths[index], load_coords=self.load_coords)
        features = torch.from_numpy(np.ascontiguousarray(feats))
        coords = torch.from_numpy(crd) if (crd is not None and self.load_coords) else None
        if self.cache:
            self._cache[index] = (features, coords)
        return features, coords

    def __getitem__(self, index: int) -> dict[str, Any]:
        features, coords = self.load(index)
        features, coords = self._augment(features, coords)
        return _item(features, coords, int(self.labels[index]), self.slide_ids[index])


class InMemoryBagDataset(_AugmentMixin, Dataset):
    """Bags held in memory (synthetic MIL tasks, the Musk benchmarks); same items as BagDataset.

    Args:
        bags: (N_i, D) arrays or tensors, one per bag.
        labels: integer bag labels.
        slide_ids: names; default ``bag_0``, ``bag_1``, ...
        coords: optional (N_i, 2) coordinates per bag.
        max_instances, feature_dropout, seed: training-mode augmentations (see BagDataset).
        eval_max_instances: evaluation-time cap (see BagDataset).
    """

    def __init__(
        self,
        bags: Sequence[np.ndarray | torch.Tensor],
        labels: Sequence[int] | np.ndarray,
        slide_ids: Sequence[str] | None = None,
        coords: Sequence[np.ndarray | torch.Tensor] | None = None,
        *,
        max_instances: int | None = None,
        eval_max_instances: int | None = None,
        feature_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        n = len(bags)
        self.bags = [_as_float32(b, i) for i, b in enumerate(bags)]
        self.labels = _as_labels(labels, n)
        self.slide_ids = (
            [f"bag_{i}" for i in range(n)] if slide_ids is None else [str(s) for s in slide_ids]
        )
        if len(self.slide_ids) != n:
            raise MilkitError(f"got {n} bags but {len(self.slide_ids)} slide ids", value=n)
        if coords is not None:
            if len(coords) != n:
                raise MilkitError(f"got {n} bags but {len(coords)} coords arrays", value=n)
            self.coords: list[torch.Tensor] | None = [
                torch.as_tensor(np.asarray(c), dtype=torch.int64) for c in coords
            ]
            for i, (b, c) in enumerate(zip(self.bags, self.coords, strict=True)):
                if c.shape != (b.shape[0], 2):
                    raise MilkitError(f"coords of bag {i} must be ({b.shape[0]}, 2)", value=c.shape)
        else:
            self.coords = None
        self._init_augment(max_instances, feature_dropout, seed, eval_max_instances)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict[str, Any]:
        coords = None if self.coords is None else self.coords[index]
        features, coords = self._augment(self.bags[index], coords)
        return _item(features, coords, int(self.labels[index]), self.slide_ids[index])


def _as_float32(bag: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
    t = bag.detach().cpu() if isinstance(bag, torch.Tensor) else torch.from_numpy(np.asarray(bag))
    if t.ndim != 2:
        raise MilkitError(f"bag {index} must be a 2-D (N, D) array", value=tuple(t.shape))
    return t.to(torch.float32).contiguous()


def _as_labels(labels: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise MilkitError(f"need one label per bag ({n})", value=arr.shape)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise MilkitError("labels must be integers (class indices)", value=arr.dtype.name)
    return arr.astype(np.int64)
