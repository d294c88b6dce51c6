"""Bag loading throughput through ``milkit.data.datasets.BagDataset`` (page-cache reads).

Writes ``--bags`` bags of ``--instances`` x ``--dim`` features per dtype (float32, float16) to a
temporary folder, reads each bag twice through ``BagDataset`` and times the second pass (files
then come from the page cache, so this measures the HDF5 read + dtype conversion path, not the
disk). Prints one JSON line per dtype: MB/s of on-disk feature bytes and of the float32 tensors
delivered, bags/s, and the same for the anchor, plain h5py (``f["features"][:]`` then a float32
tensor, as TRIDENT/CLAM-style loaders do), timed in alternating passes so that both see the same
machine load; with the 1-minute load average. Goal: >= 1 GB/s float32.

    .venv/bin/python benchmarks/bench_loading.py [--bags 50] [--instances 10000] [--dim 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _bench(folder: Path, dtype: str, bags: int, n: int, dim: int) -> dict:
    import h5py
    import torch

    from milkit.data.datasets import BagDataset
    from milkit.io.bags import write_bag

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * 256
    paths = []
    for i in range(bags):
        path = folder / f"{dtype}_{i:03d}.h5"
        write_bag(path, feats, coords, dtype=dtype)
        paths.append(path)
    ds = BagDataset(paths, np.zeros(bags, dtype=np.int64))
    for i in range(len(ds)):  # first pass: warms the page cache
        ds[i]
    ours, plain = [], []
    for _ in range(3):  # alternate milkit and plain h5py passes; best of 3 each
        t0 = time.perf_counter()
        for i in range(len(ds)):
            item = ds[i]
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for path in paths:
            with h5py.File(path, "r") as f:
                ref = torch.from_numpy(f["features"][:]).float()
        plain.append(time.perf_counter() - t0)
    elapsed, h5_elapsed = min(ours), min(plain)
    assert item["features"].shape == (n, dim) == tuple(ref.shape)
    disk_mb = bags * n * dim * np.dtype(dtype).itemsize / 1e6
    tensor_mb = bags * n * dim * 4 / 1e6
    return {
        "bench": "bag_loading",
        "dtype": dtype,
        "bags": bags,
        "instances": n,
        "dim": dim,
        "seconds": round(elapsed, 4),
        "file_MB_per_s": round(disk_mb / elapsed, 1),
        "float32_MB_per_s": round(tensor_mb / elapsed, 1),
        "bags_per_s": round(bags / elapsed, 1),
        "h5py_float32_MB_per_s": round(tensor_mb / h5_elapsed, 1),
        "ratio_to_h5py": round(h5_elapsed / elapsed, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=50)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the bags (default /tmp)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="milkit_bench_loading_", dir=args.tmp))
    try:
        for dtype in ("float32", "float16"):
            print(
                json.dumps(_bench(folder, dtype, args.bags, args.instances, args.dim)), flush=True
            )
            for p in folder.glob(f"{dtype}_*.h5"):
                p.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
