"""Benchmark: tile-read throughput (256-px tiles at 20x) through a torch DataLoader.

Each DataLoader worker opens its own slide handle in ``worker_init_fn`` (OpenSlide handles must
not be shared across processes). Prints one JSON line per worker count. Uses the cached
60,000 x 40,000 synthetic slide of bench_tiling.py (generated if missing). Goal: ≥ 600 tiles/s
with 2 workers.

    python benchmarks/bench_reading.py [--tiles 4000] [--workers 0,1,2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import make_synthetic_slide
from milkit.feature_extraction.tiling import TileGrid, TileSpec, plan_tiles, read_tile
from milkit.feature_extraction.tissue import segment_tissue

CACHE = Path(os.environ.get("MILKIT_BENCH_DIR", "/tmp/milkit_bench"))


class TileDataset(Dataset):
    """Tiles of one slide; the handle is opened per worker (or lazily in the main process)."""

    def __init__(self, path: Path, grid: TileGrid, indices: np.ndarray) -> None:
        self.path = path
        self.grid = grid
        self.indices = indices
        self.slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.slide is None:
            self.slide = Slide(self.path)
        return torch.from_numpy(read_tile(self.slide, self.grid, int(self.indices[i])))


def open_in_worker(_worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None
    info.dataset.slide = Slide(info.dataset.path)


def measure(dataset: TileDataset, workers: int, batch_size: int) -> dict[str, float]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=open_in_worker if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    c0 = time.process_time()
    t0 = time.perf_counter()
    first = None
    n = 0
    checksum = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        n += batch.shape[0]
        checksum += int(batch[:, 0, 0, 0].sum())
    t1 = time.perf_counter()
    cpu = time.process_time() - c0
    after_first = n - batch_size
    extra = {}
    if workers == 0:  # all reading happens in this process: CPU time is load-robust
        extra = {"cpu_ms_per_tile": 1e3 * cpu / max(n, 1), "cpu_bound_tiles_per_s": n / cpu}
    return {
        **extra,
        "tiles": n,
        "seconds": t1 - t0,
        "tiles_per_s": n / (t1 - t0),
        "tiles_per_s_after_first_batch": after_first / max(t1 - (first or t0), 1e-9),
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", default="60000x40000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    path = CACHE / f"synthetic_{width}x{height}.svs"
    if not path.exists():
        make_synthetic_slide(path, width, height, mpp=0.5, seed=0, tumour_regions=3)
    with Slide(path) as slide:
        grid = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
    start = len(grid) // 4  # a raster-order run from the slide's interior, as extraction reads
    indices = np.arange(start, min(len(grid), start + args.tiles))
    for workers in (int(w) for w in args.workers.split(",")):
        result = measure(TileDataset(path, grid, indices), workers, args.batch_size)
        print(
            json.dumps(
                {
                    "bench": "tile-read",
                    "slide": f"{width}x{height}",
                    "tile": "256px @ 20x (level 0, 0.5 um/px)",
                    "workers": workers,
                    "batch_size": args.batch_size,
                    **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
                    "cpu_count": os.cpu_count(),
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
