"""Segmentation + tile coordinates, milkit against CLAM's own create_patches_fp on the same slide.

Interleaved rounds on the cached 60,000 x 40,000 synthetic slide of ``bench_tiling.py``: CLAM's
``WholeSlideImage.segmentTissue`` + ``process_contours`` with the script's defaults (run by
``clam_tiling_anchor.py`` in a subprocess, timed inside it, slide opening excluded) and milkit's
``segment_tissue`` + ``plan_tiles`` at 256 px / 0.5 µm/px (= level 0 here, like CLAM's;
slide opening included). Agreement: IoU of the areas the two tile sets cover (CLAM starts its
grid at each contour's corner, so tiles are compared as covered area on a 1/64 raster, not as
coordinates). One JSON line per round and a summary, each with the 1-minute load average.

    python benchmarks/bench_tiling_clam.py --clam-repo /path/to/CLAM [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
SCALE = 64  # raster cell: 64 x 64 level-0 px


def covered(coords: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """Boolean raster (1/SCALE) of the area the (N, 2) level-0 tiles of side ``size`` cover."""
    mask = np.zeros(shape, dtype=bool)
    s = size // SCALE
    for x, y in (coords // SCALE).astype(int):
        mask[y : y + s, x : x + s] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clam-repo", type=Path, required=True, help="CLAM checkout")
    ap.add_argument("--size", default="60000x40000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import h5py
    from bench_tiling import cached_slide, run_once

    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.tiling import TileSpec, plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue

    width, height = (int(v) for v in args.size.lower().split("x"))
    path, _ = cached_slide(width, height)
    spec = TileSpec(patch_size=256, mpp=0.5, min_tissue=0.25)
    ours_s, clam_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("clam_tiling_anchor.py")),
                str(args.clam_repo),
                str(path),
                tmp,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                raise SystemExit(f"CLAM anchor failed:\n{res.stderr[-3000:]}")
            clam = json.loads(res.stdout.strip().splitlines()[-1])
            ours = run_once(path, spec)
            clam_s.append(clam["seg_s"] + clam["patch_s"])
            ours_s.append(ours["total_s"])
            print(
                json.dumps(
                    {
                        "bench": "round",
                        "round": rnd,
                        "clam_seg_s": round(clam["seg_s"], 3),
                        "clam_patch_s": round(clam["patch_s"], 3),
                        "milkit_total_s": round(ours["total_s"], 3),
                        "ratio": round(clam_s[-1] / ours_s[-1], 2),
                        "loadavg_1m": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
        with h5py.File(clam["coords_h5"], "r") as f:
            clam_coords = f["coords"][:]
            clam_size = int(f["coords"].attrs["patch_size"]) * int(
                2 ** f["coords"].attrs.get("patch_level", 0)
            )
    with Slide(path) as slide:
        grid = plan_tiles(slide, segment_tissue(slide), spec)
    shape = (height // SCALE + 8, width // SCALE + 8)
    a = covered(clam_coords, clam_size, shape)
    b = covered(grid.coords, int(grid.patch_size_level0), shape)
    iou = float((a & b).sum() / max(1, (a | b).sum()))
    print(
        json.dumps(
            {
                "bench": "summary",
                "slide": args.size,
                "clam_tiles": len(clam_coords),
                "milkit_tiles": len(grid),
                "clam_median_s": round(statistics.median(clam_s), 3),
                "milkit_median_s": round(statistics.median(ours_s), 3),
                "ratio_median": round(
                    statistics.median(c / o for c, o in zip(clam_s, ours_s, strict=True)), 2
                ),
                "covered_area_iou": round(iou, 3),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
