"""resnet50-trunc extraction, milkit against CLAM on the same tiles and threads, interleaved.

Prints one JSON line per measurement (never part of the test suite), each with the 1-minute load
average:

- ``setup``: slide, tiles, threads, CLAM anchor kind;
- ``prepare``: one-off cost of each milkit path beyond building the eager model (oneDNN
  fusion, torch.compile, ONNX export, OpenVINO compile);
- ``round``: patches/s of CLAM and of every milkit path in one round (same tiles, run back to
  back), with each path's ratio to CLAM in that round. The load of a shared machine drifts within
  a round, so CLAM runs before each round and once more after the last: a path's ratio is to the
  geometric mean of the CLAM runs just before and just after its round;
- ``summary``: per path, the median over rounds of patches/s and of the ratio to CLAM; the same
  with the path's preparation counted once per run (``incl_prepare``, for a run of the timed
  tiles, of the slide's tissue tiles once and of 2,000 tiles: N / (prepare + N / rate), against
  CLAM's rate); the worst per-tile cosine of its features against milkit's eager torch fp32
  features (and CLAM's).

The anchor is CLAM's own ``extract_features_fp.py`` loop when ``--clam-repo`` points at a CLAM
checkout (github.com/mahmoodlab/CLAM; never vendored here): ``get_encoder("resnet50_trunc")``
(timm ``resnet50.tv_in1k`` ``features_only``, layer3 + adaptive average pool, fp32),
``Whole_Slide_Bag_FP`` (OpenSlide ``read_region`` + PIL ``Resize(224)``/``ToTensor``/
``Normalize`` per tile), ``DataLoader(batch_size=256)`` with no worker (its CPU setting) and
``compute_w_loader`` (``torch.inference_mode``, HDF5 append per batch), run in a subprocess by
``benchmarks/clam_anchor.py``. Without ``--clam-repo`` the same per-batch work is done here and
named ``CLAM-equivalent loop``. Both sides load the same random ResNet-50 weights (speed does
not depend on them) and run with ``--threads`` intra-op threads. Model building is outside the
timings on both sides; milkit's one-off preparations are reported separately.

milkit paths (``--paths``): ``default`` (what ``milkit preprocess`` runs: fp32, channels_last,
BatchNorm folded, oneDNN-fused for resnet50-trunc), ``torch-eager`` (``--compile off``: the same
without the fusion; the features' reference), ``torch-compile`` (``--compile on``), and the
opt-in ``onnxruntime``, ``openvino`` (fp32), ``onnxruntime-int8`` and ``openvino-bf16``
(native-bf16 CPUs only).

Usage: ``python benchmarks/bench_extract.py --clam-repo /path/to/CLAM [--tiles 64]
[--rounds 3] [--threads 2] [--slide FILE.svs]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
REPO = Path(__file__).resolve().parent.parent
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
PATHS = {  # name → (runtime, precision, compile)
    "default": ("torch", "fp32", "auto"),
    "torch-eager": ("torch", "fp32", "off"),
    "torch-compile": ("torch", "fp32", "on"),
    "onnxruntime": ("onnxruntime", "fp32", "off"),
    "onnxruntime-int8": ("onnxruntime", "int8", "off"),
    "openvino": ("openvino", "fp32", "off"),
    "openvino-bf16": ("openvino", "bf16", "off"),
}
CLAM_BATCH = 256  # extract_features_fp.py --batch_size default


def emit(**record: object) -> None:
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="slide to tile")
    ap.add_argument("--tiles", type=int, default=64, help="tiles per timed run (cycled)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument(
        "--workers", type=int, default=None, help="milkit reader processes (default: its own)"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="milkit batch (its default)")
    ap.add_argument("--clam-repo", type=Path, help="CLAM checkout (else CLAM-equivalent loop)")
    ap.add_argument("--paths", default=",".join(PATHS), help="milkit paths to time")
    ap.add_argument(
        "--fast-encoder",
        type=int,
        default=0,
        metavar="N",
        help="only time the weight-free `fast` encoder end to end on N tiles (no CLAM)",
    )
    args = ap.parse_args()

    import numpy as np
    import torch

    from milkit.feature_extraction.encode import encode_grid
    from milkit.feature_extraction.encoders import create_encoder
    from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.tiling import plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue

    torch.set_num_threads(args.threads)
    names = [p for p in args.paths.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with Slide(args.slide) as slide:
            from milkit.feature_extraction.tiling import TileSpec

            full = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
        idx = np.arange(args.tiles) % len(full)  # the slide's tissue tiles, cycled
        grid = type(full)(
            **{
                **full.__dict__,
                "coords": full.coords[idx],
                "tissue_fraction": full.tissue_fraction[idx],
            }
        )
        torch.manual_seed(0)
        weights = tmp / "resnet50_random.pth"
        torch.save(build_resnet50_backbone().state_dict(), weights)
        if args.fast_encoder:
            _time_fast(args, full, encode_grid, create_encoder)
            return
        coords_h5 = _clam_coords(tmp / "coords.h5", grid)
        emit(
            bench="setup",
            slide=args.slide.name,
            tissue_tiles=len(full),
            tiles_timed=len(grid),
            read_level=int(grid.read_level),
            read_size=int(grid.read_size),
            torch_threads=torch.get_num_threads(),
            cpus=os.cpu_count(),
            anchor="CLAM extract_features_fp.py" if args.clam_repo else "CLAM-equivalent loop",
        )

        encoders = {}
        # Building the eager model (timm, weights, BatchNorm folding) is outside the timings on
        # both sides; a path's preparation is what it costs beyond that: what prepare() and
        # create_encoder do beyond the eager build (compiling, converting), plus its first
        # batch's excess over a steady batch (the oneDNN fusion happens there). The process's
        # first oneDNN kernels (CLAM pays them inside its loop) are timed once, as the excess of
        # an eager first batch over a second one, and counted for every torch path.
        builds = []
        for _ in range(3):  # the first pays imports and the page cache
            t0 = time.perf_counter()
            eager, _ = create_encoder("resnet50-trunc", weights=weights, compile="off")
            builds.append(time.perf_counter() - t0)
        build_s = min(builds[1:])
        from milkit.feature_extraction.tiling import read_tile

        with Slide(args.slide) as slide:
            first = torch.from_numpy(
                np.stack(
                    [read_tile(slide, grid, i) for i in range(min(len(grid), args.batch_size))]
                )
            )
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            eager.encode(first)
            times.append(time.perf_counter() - t0)
        init_s = max(0.0, times[0] - times[1])
        emit(bench="process_init", eager_first_batch_excess_s=round(init_s, 2))
        prepare_s: dict[str, float] = {}
        for name in names:
            runtime, precision, compile_ = PATHS[name]
            t0 = time.perf_counter()
            try:
                enc, _ = create_encoder(
                    "resnet50-trunc",
                    weights=weights,
                    precision=precision,
                    runtime=runtime,
                    compile=compile_,
                )
                t1 = time.perf_counter()
                enc.prepare(len(grid), args.batch_size)
                t2 = time.perf_counter()
                enc.encode(first)
                t3 = time.perf_counter()
                enc.encode(first)
                t4 = time.perf_counter()
            except Exception as err:  # a runtime that is not installed: say so, go on
                emit(bench="prepare", path=name, skipped=f"{type(err).__name__}: {err}")
                continue
            encoders[name] = enc
            # torch paths prepare in prepare() and their first batch; the other runtimes
            # convert in create_encoder
            converted = init_s if runtime == "torch" else max(0.0, t1 - t0 - build_s)
            first_excess = max(0.0, (t3 - t2) - (t4 - t3))
            prepare_s[name] = t2 - t1 + converted + first_excess
            emit(
                bench="prepare",
                path=name,
                runtime=enc.runtime,
                precision=enc.precision,
                execution=enc.execution,
                seconds=round(prepare_s[name], 2),
                of_which_first_batch_excess=round(first_excess, 2),
                eager_build_s=round(build_s, 2),
            )

        rates: dict[str, list[float]] = {n: [] for n in ["clam", *encoders]}
        ratios: dict[str, list[float]] = {n: [] for n in encoders}
        feats: dict[str, np.ndarray] = {}

        def clam_rate(tag: str) -> float:
            out_h5 = tmp / f"clam_{tag}.h5"
            clam_s = _run_clam(
                args, slide_path=args.slide, coords_h5=coords_h5, weights=weights, out_h5=out_h5
            )
            if "clam" not in feats:
                import h5py

                with h5py.File(out_h5, "r") as f:
                    feats["clam"] = f["features"][:]
            return len(grid) / clam_s

        before = clam_rate("0")
        for rnd in range(args.rounds):
            row: dict[str, float] = {}
            for name, enc in encoders.items():
                t0 = time.perf_counter()
                f, ok, _, _ = encode_grid(
                    args.slide,
                    None,
                    grid,
                    enc,
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                )
                dt = time.perf_counter() - t0
                assert ok.all()
                feats.setdefault(name, f)
                rates[name].append(len(grid) / dt)
                row[name] = round(len(grid) / dt, 2)
            after = clam_rate(str(rnd + 1))
            anchor = (before * after) ** 0.5
            rates["clam"].append(anchor)
            for name in encoders:
                ratios[name].append(rates[name][-1] / anchor)
            emit(
                bench="round",
                round=rnd,
                clam_before_after=[round(before, 2), round(after, 2)],
                patches_per_s=row,
                ratio_to_clam={n: round(r[-1], 2) for n, r in ratios.items()},
            )
            before = after

        ref = feats.get("torch-eager")
        clam_median = statistics.median(rates["clam"])
        run_lengths = sorted({len(grid), len(full), 2000})
        for name in ["clam", *encoders]:
            rec: dict[str, object] = {
                "bench": "summary",
                "path": name,
                "patches_per_s_median": round(statistics.median(rates[name]), 2),
            }
            if name != "clam":
                enc = encoders[name]
                rec.update(runtime=enc.runtime, precision=enc.precision, execution=enc.execution)
                rec["ratio_to_clam_median"] = round(statistics.median(ratios[name]), 2)
                rate = statistics.median(rates[name])
                incl = {n: n / (prepare_s[name] + n / rate) for n in run_lengths}
                rec["prepare_s"] = round(prepare_s[name], 2)
                rec["incl_prepare_patches_per_s"] = {n: round(v, 2) for n, v in incl.items()}
                rec["incl_prepare_ratio_to_clam"] = {
                    n: round(v / clam_median, 2) for n, v in incl.items()
                }
            if ref is not None and name != "torch-eager":
                rec["cosine_min_vs_milkit_fp32"] = _cos_min(feats[name], ref)
            if name != "clam":
                rec["cosine_min_vs_clam"] = _cos_min(feats[name], feats["clam"])
            emit(**rec)


def _time_fast(args, full, encode_grid, create_encoder) -> None:
    """End-to-end patches/s of the weight-free ``fast`` encoder (readers + encoder)."""
    import numpy as np

    idx = np.arange(args.fast_encoder) % len(full)
    grid = type(full)(
        **{
            **full.__dict__,
            "coords": full.coords[idx],
            "tissue_fraction": full.tissue_fraction[idx],
        }
    )
    enc, _ = create_encoder("fast")
    for workers in (0, 2 if args.workers is None else args.workers):
        t0 = time.perf_counter()
        _, _, read_s, encode_s = encode_grid(
            args.slide, None, grid, enc, batch_size=args.batch_size, num_workers=workers
        )
        dt = time.perf_counter() - t0
        emit(
            bench="fast_encoder",
            workers=workers,
            tiles=len(grid),
            patches_per_s=round(len(grid) / dt, 1),
            encode_s=round(encode_s, 2),
            waiting_for_tiles_s=round(read_s, 2),
            note="includes reader start-up",
        )


def _cos_min(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return round(float(cos.min()), 7)


def _clam_coords(path: Path, grid) -> Path:
    """The tiles in CLAM's patch file layout: ``coords`` with ``patch_level``/``patch_size``."""
    import h5py

    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=grid.coords.astype("int64"))
        d.attrs["patch_level"] = int(grid.read_level)
        d.attrs["patch_size"] = int(grid.read_size)
    return path


def _run_clam(args, *, slide_path: Path, coords_h5: Path, weights: Path, out_h5: Path) -> float:
    """Seconds CLAM's loop takes for the tiles (its own code, or the equivalent loop here)."""
    if out_h5.exists():
        out_h5.unlink()
    if args.clam_repo:
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("clam_anchor.py")),
            str(args.clam_repo),
            str(slide_path),
            str(coords_h5),
            str(weights),
            str(args.threads),
            str(CLAM_BATCH),
            str(out_h5),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"CLAM anchor failed:\n{res.stderr[-3000:]}")
        return float(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])
    return _clam_equivalent(slide_path, coords_h5, weights, out_h5)


def _clam_equivalent(slide_path: Path, coords_h5: Path, weights: Path, out_h5: Path) -> float:
    """CLAM-equivalent loop: the per-batch work of CLAM's extract_features_fp.py on CPU."""
    import h5py
    import numpy as np
    import openslide
    import timm
    import torch
    from torchvision import transforms

    class Trunc(torch.nn.Module):  # TimmCNNEncoder: features_only layer3 + adaptive avg pool
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model(
                "resnet50.tv_in1k", features_only=True, out_indices=(3,), pretrained=False
            )
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.model(x)[0]).squeeze(-1).squeeze(-1)

    model = Trunc()
    model.model.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    model.eval()
    tfm = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    wsi = openslide.open_slide(str(slide_path))

    class Bag(torch.utils.data.Dataset):
        def __init__(self) -> None:
            with h5py.File(coords_h5, "r") as f:
                self.n = len(f["coords"])
                self.level = int(f["coords"].attrs["patch_level"])
                self.size = int(f["coords"].attrs["patch_size"])

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i):
            with h5py.File(coords_h5, "r") as f:  # CLAM reopens the patch file per tile
                coord = f["coords"][i]
            img = wsi.read_region(coord, self.level, (self.size, self.size)).convert("RGB")
            return {"img": tfm(img), "coord": coord}

    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(Bag(), batch_size=CLAM_BATCH)
    first = True
    for data in loader:
        with torch.inference_mode():
            out = model(data["img"]).cpu().numpy().astype(np.float32)
        with h5py.File(out_h5, "w" if first else "a") as f:
            if first:
                f.create_dataset(
                    "features", data=out, maxshape=(None, out.shape[1]), chunks=(32, out.shape[1])
                )
            else:
                d = f["features"]
                d.resize(len(d) + len(out), axis=0)
                d[-len(out) :] = out
        first = False
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
