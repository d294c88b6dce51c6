"""Classic MIL benchmarks (Musk1, Musk2, other MIProblems sets) as in-memory bags.

Two file layouts are read:

- MIProblems (GitHub ``pevnak/MIProblems``): ``data.csv`` tab-separated and FEATURE-MAJOR (D rows
  x N instance columns, so it is transposed here), ``labels.csv`` (one 0/1 per instance, the
  label of its bag) and ``bagids.csv`` (one bag id per instance).
- The ``mil`` package's CSV (GitHub ``rosasalberto/mil``, e.g. ``musk2_rosasalberto_mil.csv``):
  comma-separated, no header, column 0 the bag label, column 1 the bag id, the rest features.

Musk features are raw integers; standardise them with statistics of the training bags only
(``Standardizer.fit`` on the training fold) — fitting on all bags leaks the test fold.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milkit.errors import MilkitError

ENV_ROOT = "MILKIT_MIL_BENCHMARKS"  # folder holding Musk1/, Musk2/, ... for lookup by name
_MIPROBLEMS_FILES = ("data.csv", "labels.csv", "bagids.csv")


@dataclass
class MILBenchmark:
    """A bag-level MIL dataset held in memory.

    Attributes:
        bags: one (N_i, D) float32 array per bag, ordered by bag id.
        labels: (B,) int64 bag labels (0/1 for Musk).
        name: dataset name (folder name).
        bag_ids: (B,) original bag ids from the files.
    """

    bags: list[np.ndarray]
    labels: np.ndarray
    name: str
    bag_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def dim(self) -> int:
        return int(self.bags[0].shape[1]) if self.bags else 0

    @property
    def bag_sizes(self) -> np.ndarray:
        return np.array([len(b) for b in self.bags], dtype=np.int64)

    @property
    def num_instances(self) -> int:
        return int(self.bag_sizes.sum())

    def stats(self) -> dict[str, Any]:
        """The numbers of the benchmark README table (bags, classes, instances, sizes)."""
        sizes = self.bag_sizes
        return {
            "name": self.name,
            "bags": len(self),
            "positive": int((self.labels == 1).sum()),
            "negative": int((self.labels == 0).sum()),
            "instances": self.num_instances,
            "features": self.dim,
            "bag_size_min": int(sizes.min()),
            "bag_size_mean": float(sizes.mean()),
            "bag_size_max": int(sizes.max()),
        }

    def subset(self, indices: Sequence[int] | np.ndarray) -> MILBenchmark:
        """The bags at ``indices`` (e.g. one CV fold)."""
        idx = np.asarray(indices, dtype=np.int64)
        ids = self.bag_ids[idx] if len(self.bag_ids) == len(self.bags) else self.bag_ids
        return MILBenchmark([self.bags[i] for i in idx], self.labels[idx], self.name, ids)

    def to_dataset(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        standardizer: Standardizer | None = None,
        **kwargs: Any,
    ) -> Any:
        """An ``InMemoryBagDataset`` of the bags (optionally a subset, optionally standardised).

        Slide ids are ``<name>_bag<id>``. Extra keyword arguments go to the dataset.
        """
        from milkit.data.datasets import InMemoryBagDataset

        sub = self if indices is None else self.subset(indices)
        bags = sub.bags if standardizer is None else standardizer.transform(sub.bags)
        ids = sub.bag_ids if len(sub.bag_ids) == len(sub.bags) else np.arange(len(sub.bags))
        slide_ids = [f"{self.name}_bag{int(i)}" for i in ids]
        return InMemoryBagDataset(bags, sub.labels, slide_ids, **kwargs)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature z-scoring with statistics of the instances of the training bags.

    Features with zero variance get std 1 (they are only centred).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, bags: Sequence[np.ndarray]) -> Standardizer:
        if len(bags) == 0:
            raise MilkitError("cannot fit a standardizer on zero bags", value=0)
        stacked = np.concatenate([np.asarray(b, dtype=np.float64) for b in bags], axis=0)
        mean = stacked.mean(axis=0)
        std = stacked.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [
            ((np.asarray(b, np.float32) - self.mean) / self.std).astype(np.float32) for b in bags
        ]


def fit_standardizer(train_bags: Sequence[np.ndarray]) -> Standardizer:
    """Fit z-scoring on the TRAINING bags only (see ``Standardizer``)."""
    return Standardizer.fit(train_bags)


def benchmark_folds(
    labels: Sequence[int] | np.ndarray, folds: int = 10, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified bag-level k-fold (train, test) indices: the protocol of Ilse et al. 2018 and
    Wang et al. 2018 (10-fold CV, repeated with different seeds)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(y)), y)]


def _group(
    features: np.ndarray, labels: np.ndarray, bag_ids: np.ndarray, name: str, path: Path
) -> MILBenchmark:
    if not (len(features) == len(labels) == len(bag_ids)):
        raise MilkitError(
            "instance counts of features, labels and bag ids differ",
            value=(len(features), len(labels), len(bag_ids)),
            path=path,
        )
    if not np.isfinite(features).all():
        raise MilkitError("benchmark features contain NaN/inf", path=path)
    labels = labels.astype(np.int64)
    if labels.min() < 0:  # some MIL files write negatives as -1
        labels = (labels > 0).astype(np.int64)
    order = np.argsort(bag_ids, kind="stable")
    ids, starts = np.unique(bag_ids[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    bags, bag_labels = [], []
    for k in range(len(ids)):
        rows = order[bounds[k] : bounds[k + 1]]
        bags.append(np.ascontiguousarray(features[rows], dtype=np.float32))
        # Standard MIL assumption: a bag is positive iff one of its instances is. For Musk every
        # instance carries its bag's label, so this equals the first label of the bag.
        bag_labels.append(int(labels[rows].max()))
    return MILBenchmark(bags, np.asarray(bag_labels, dtype=np.int64), name, ids.astype(np.int64))


def _read_vector(path: Path) -> np.ndarray:
    try:
        return pd.read_csv(path, header=None, sep=r"\s+").to_numpy().ravel()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise MilkitError(f"cannot parse benchmark file ({err})", path=path) from err


def _load_miproblems(folder: Path, name: str) -> MILBenchmark:
    data_path = folder / "data.csv"
    try:
        data = pd.read_csv(data_path, header=None, sep="\t", dtype=np.float64).to_numpy()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise MilkitError(f"cannot parse MIProblems data.csv ({err})", path=data_path) from err
    features = np.ascontiguousarray(data.T)  # stored D x N (feature-major): transpose
    labels = _read_vector(folder / "labels.csv")
    bag_ids = _read_vector(folder / "bagids.csv")
    return _group(features, labels, bag_ids, name, data_path)


def _load_label_id_csv(path: Path, name: str) -> MILBenchmark:
    try:
        data = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise MilkitError(f"cannot parse MIL benchmark CSV ({err})", path=path) from err
    if data.ndim != 2 or data.shape[1] < 3:
        raise MilkitError(
            "MIL CSV needs columns label, bag_id, features...", value=data.shape, path=path
        )
    return _group(data[:, 2:], data[:, 0], data[:, 1], name, path)


def _find_folder(name: str, root: str | os.PathLike[str] | None) -> Path | None:
    roots = [Path(root)] if root is not None else []
    if os.environ.get(ENV_ROOT):
        roots.append(Path(os.environ[ENV_ROOT]))
    for r in roots:
        if not r.is_dir():
            continue
        for child in sorted(r.iterdir()):
            if child.is_dir() and child.name.lower() == name.lower():
                return child
    return None


def load_mil_benchmark(
    name_or_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> MILBenchmark:
    """Load a MIL benchmark from its folder (or a single label/bag-id CSV file).

    ``name_or_dir`` is a folder (``Musk1/`` with the three MIProblems files, or ``Musk2/`` with
    ``musk2_rosasalberto_mil.csv``), a CSV file, or a dataset name (``musk1``) looked up
    case-insensitively under ``root`` or the ``MILKIT_MIL_BENCHMARKS`` folder.
    """
    path = Path(name_or_dir)
    if path.is_file():
        return _load_label_id_csv(path, path.parent.name or path.stem)
    if not path.is_dir():
        found = _find_folder(str(name_or_dir), root)
        if found is None:
            raise MilkitError(
                "MIL benchmark not found",
                value=str(name_or_dir),
                path=root,
                hint=f"Pass the dataset folder, or its name with root=... or ${ENV_ROOT} set to "
                "the folder that holds it (e.g. Musk1/, Musk2/)",
            )
        path = found
    name = path.name
    if all((path / f).is_file() for f in _MIPROBLEMS_FILES):
        return _load_miproblems(path, name)
    candidates = sorted(
        p for p in path.glob("*.csv") if p.name not in _MIPROBLEMS_FILES and p.is_file()
    )
    if len(candidates) == 1:
        return _load_label_id_csv(candidates[0], name)
    raise MilkitError(
        "folder holds no MIL benchmark (need data.csv + labels.csv + bagids.csv, or one "
        f"label,bag_id,features CSV; found {[p.name for p in path.iterdir()]})",
        path=path,
    )


__all__ = [
    "ENV_ROOT",
    "MILBenchmark",
    "Standardizer",
    "benchmark_folds",
    "fit_standardizer",
    "load_mil_benchmark",
]
