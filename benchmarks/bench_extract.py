"""Extraction throughput on a synthetic slide: tile reading vs encoding vs end to end.

Prints one JSON line per measurement (never part of the test suite):

- ``read``: tiles/s delivered by the DataLoader readers alone (decode + resize, no encoder),
- ``encode``: patches/s of the encoder alone on tiles already in memory,
- ``end_to_end``: patches/s of ``encode_grid`` (readers and encoder overlapping).

Encoders: ``resnet50-trunc`` with random weights (speed does not depend on them) under bf16
autocast + channels_last (and fp32 for reference), and the weight-free ``fast`` encoder.
Goal from the issue: resnet50-trunc ≥ 3× CLAM's 8.7 patches/s (≥ 26/s) with reading never the
bottleneck. Usage: ``python benchmarks/bench_extract.py [--tiles 256] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def emit(**record: object) -> None:
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    record["cpus"] = os.cpu_count()
    print(json.dumps(record), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=6144, help="synthetic slide side (px)")
    ap.add_argument("--tiles", type=int, default=256, help="tiles to time per measurement")
    ap.add_argument("--workers", type=int, default=2, help="reader processes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cnn-tiles", type=int, default=32, help="tiles timed for resnet50-trunc")
    ap.add_argument("--bf16", action="store_true", help="also time explicit bf16 autocast")
    args = ap.parse_args()

    import numpy as np
    import torch
    from milkit.feature_extraction.encoders import create_encoder
    from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone
    from milkit.feature_extraction.extract import TileDataset, encode_grid
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.synthetic import make_synthetic_slide
    from milkit.feature_extraction.tiling import TileSpec, plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        slide_path = make_synthetic_slide(
            tmp_path / "bench.svs", args.size, args.size, mpp=0.5, seed=0, tissue_fraction=0.9
        ).path
        with Slide(slide_path) as slide:
            grid = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
        n = min(args.tiles, len(grid))
        sub = type(grid)(
            **{
                **grid.__dict__,
                "coords": grid.coords[:n],
                "tissue_fraction": grid.tissue_fraction[:n],
            }
        )
        emit(
            bench="setup",
            slide_px=args.size,
            tiles_in_slide=len(grid),
            tiles_timed=n,
            torch_threads=torch.get_num_threads(),
        )

        # Reading alone, in-process and through DataLoader workers.
        ds = TileDataset(slide_path, None, sub)
        t0 = time.perf_counter()
        tiles = np.stack([ds[i][0] for i in range(n)])
        dt = time.perf_counter() - t0
        ds.close()
        emit(bench="read", workers=0, tiles_per_s=round(n / dt, 1))
        null = _NullEncoder()
        t0 = time.perf_counter()
        encode_grid(
            slide_path, None, sub, null, batch_size=args.batch_size, num_workers=args.workers
        )
        dt = time.perf_counter() - t0
        emit(
            bench="read",
            workers=args.workers,
            tiles_per_s=round(n / dt, 1),
            note="includes reader start-up",
        )

        weights = tmp_path / "resnet50_random.pth"
        torch.save(build_resnet50_backbone().state_dict(), weights)
        batch = torch.from_numpy(tiles)
        runs = [("resnet50-trunc", weights, "auto"), ("fast", None, "auto")]
        if args.bf16:
            runs.insert(1, ("resnet50-trunc", weights, "bf16"))
        for name, w, precision in runs:
            enc, _ = create_encoder(name, weights=w, device=args.device, precision=precision)
            m = min(n, args.cnn_tiles) if name != "fast" else n
            enc.encode(batch[: min(4, m)])  # warm-up (oneDNN kernel selection)
            t0 = time.perf_counter()
            c0 = time.process_time()
            for s in range(0, m, args.batch_size):
                enc.encode(batch[s : s + args.batch_size])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            emit(
                bench="encode",
                encoder=name,
                precision=enc.precision,
                channels_last=True,
                patches=m,
                patches_per_s=round(m / dt, 2),
                cpu_s_per_patch=round(cpu / m, 5),
            )
            if precision == "bf16":
                continue  # explicit bf16 is a comparison point only
            sub2 = type(grid)(
                **{
                    **sub.__dict__,
                    "coords": sub.coords[:m],
                    "tissue_fraction": sub.tissue_fraction[:m],
                }
            )
            t0 = time.perf_counter()
            _, _, read_s, encode_s = encode_grid(
                slide_path, None, sub2, enc, batch_size=args.batch_size, num_workers=args.workers
            )
            dt = time.perf_counter() - t0
            emit(
                bench="end_to_end",
                encoder=name,
                precision=enc.precision,
                workers=args.workers,
                patches=m,
                patches_per_s=round(m / dt, 2),
                waiting_for_tiles_s=round(read_s, 2),
                encoding_s=round(encode_s, 2),
            )


class _NullEncoder:
    """Stands in for an encoder so ``encode_grid`` measures reading alone."""

    class cfg:  # mimics EncoderCfg's attribute access
        embed_dim = 1

    device = __import__("torch").device("cpu")

    def encode(self, tiles):
        import torch

        return torch.zeros(tiles.shape[0], 1)


if __name__ == "__main__":
    main()
