"""Everything milkit needs to know about a lent GPU, measured in one call, written to one JSON.

Lent GPUs come rarely and briefly (one command ≤ 10 min, no network, no OpenSlide). This script
is run by ``benchmarks/gpu_check.sh`` on the device machine and, stage by stage, with a time
budget per stage so that a slow stage cannot eat the others:

1. ``env``: GPU name, memory, driver, torch/CUDA versions, whether mamba-ssm imports;
2. ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``) with their pass/fail counts;
3. ``extraction``: end-to-end patches/s (tile reading + encoder, ``encode_grid``) of
   ``resnet50-trunc`` and the ViT-L/16 ``uni`` encoder (random weights: speed does not depend on
   them) on a synthetic slide, with the GPU's busy % sampled during the run;
4. ``training_step``: forward + backward time and peak GPU memory of every registered aggregator
   at N = 10⁵, D = 1024 (``benchmarks/bench_models.py --device cuda``, one subprocess each);
5. ``scan``: MambaMIL's pure-PyTorch selective scan on CUDA against the float64 CPU reference
   (max |Δ|), its time, and mamba-ssm's kernels when they are installed (they cannot be built
   without network inside the lease: said in the JSON).

Goals from the performance issue (H100-class GPU): ≥ 1,000 patches/s resnet50-trunc and
≥ 300/s ViT-L end to end. Run locally with ``--smoke`` (tiny sizes, CPU allowed) to check the
script itself before spending device time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _stage(results: dict[str, Any], name: str, fn, *args: Any) -> None:
    """Run one stage; its failure is recorded, never fatal to the stages after it."""
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as err:  # a broken stage must not cost the other measurements
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {json.dumps(results[name])[:600]}", flush=True)


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count
        )
    try:
        import mamba_ssm

        info["mamba_ssm"] = mamba_ssm.__version__
    except Exception as err:
        info["mamba_ssm"] = f"not importable ({type(err).__name__})"
    return info


def gpu_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = out.stdout.strip().splitlines()[-25:]
    return {"returncode": out.returncode, "summary": tail[-1] if tail else "", "tail": tail}


class _BusySampler:
    """Samples the GPU's utilisation (%) every 100 ms in a thread while a block runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization())
        except Exception:  # no NVML binding: ask nvidia-smi
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            )  # fmt: skip
            return float(out.stdout.split()[0]) if out.returncode == 0 else None

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> _BusySampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def extraction(device: str, slide_px: int, workers: int, batch_size: int) -> dict[str, Any]:
    import torch

    from milkit.feature_extraction.encode import encode_grid
    from milkit.feature_extraction.encoders import create_encoder
    from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone
    from milkit.feature_extraction.encoders.vit import build_timm_vit
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.synthetic import make_synthetic_slide
    from milkit.feature_extraction.tiling import TileSpec, plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        slide_path = make_synthetic_slide(
            tmp_path / "gpu.svs", slide_px, slide_px, mpp=0.5, seed=0, tissue_fraction=0.9
        ).path
        with Slide(slide_path) as slide:
            grid = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
        rows["tiles"] = len(grid)
        weights = {
            "resnet50-trunc": build_resnet50_backbone().state_dict(),
            "uni": build_timm_vit("uni").state_dict(),
        }
        for name, state in weights.items():
            path = tmp_path / f"{name}.pth"
            torch.save(state, path)
            try:
                enc, cfg = create_encoder(name, weights=path, device=device)
                warm = type(grid)(**{**grid.__dict__, "coords": grid.coords[:batch_size],
                                     "tissue_fraction": grid.tissue_fraction[:batch_size]})  # fmt: skip
                encode_grid(slide_path, None, warm, enc, batch_size=batch_size, num_workers=workers)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                with _BusySampler(device.startswith("cuda")) as busy:
                    t0 = time.perf_counter()
                    _, ok, read_s, encode_s = encode_grid(
                        slide_path, None, grid, enc, batch_size=batch_size, num_workers=workers
                    )
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                rows[name] = {
                    "patches_per_s": round(len(grid) / dt, 1),
                    "precision": enc.precision,
                    "tiles_ok": int(ok.sum()),
                    "waiting_for_tiles_s": round(read_s, 2),
                    "encoding_s": round(encode_s, 2),
                    "gpu_busy_pct_mean": busy.mean,
                    "workers": workers,
                    "batch_size": batch_size,
                    "embed_dim": cfg.embed_dim,
                }
                del enc
            except Exception as err:
                rows[name] = {"error": f"{type(err).__name__}: {err}"}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def training_steps(device: str, size: int, timeout: float, models: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_models.py"), "--device", device,
           "--sizes", str(size), "--models", models, "--repeats", "3",
           "--timeout", str(timeout)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout * 40)
    rows = []
    for line in out.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if out.returncode != 0:
        rows.append({"error": out.stderr.strip().splitlines()[-3:]})
    return rows


def scan(device: str, length: int) -> dict[str, Any]:
    import torch

    from milkit.models.layers.selective_scan import selective_scan_chunked, selective_scan_ref

    torch.manual_seed(0)
    d, n = 64, 16
    u = torch.randn(1, d, length, dtype=torch.float64)
    delta = torch.rand(1, d, length, dtype=torch.float64) * 0.1
    a = -torch.rand(d, n, dtype=torch.float64)
    b = torch.randn(1, n, length, dtype=torch.float64)
    c = torch.randn(1, n, length, dtype=torch.float64)
    dd = torch.randn(d, dtype=torch.float64)
    ref = selective_scan_ref(u, delta, a, b, c, dd)
    args = [t.to(device=device, dtype=torch.float32) for t in (u, delta, a, b, c, dd)]
    out = selective_scan_chunked(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        selective_scan_chunked(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    row: dict[str, Any] = {
        "L": length,
        "torch_scan_ms": round((time.perf_counter() - t0) / 5 * 1000, 2),
        "max_abs_diff_vs_cpu_f64": float((out.double().cpu() - ref).abs().max()),
        "ref_scale": float(ref.abs().max()),
    }
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        kern = selective_scan_fn(*args, delta_softplus=False)
        row["mamba_ssm_max_abs_diff_vs_cpu_f64"] = float((kern.double().cpu() - ref).abs().max())
    except Exception as err:
        row["mamba_ssm"] = (
            f"not run: {type(err).__name__} (its CUDA kernels are built from source; the lent "
            "machine has no network to fetch mamba-ssm)"
        )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes; runs on CPU to test the script"
    )
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    args = ap.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("[gpu_check] no CUDA device: pass --smoke to test the script on CPU", file=sys.stderr)
        return 2
    small = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device}
    stages = [
        ("env", env_info),
        ("gpu_tests", gpu_tests, 150.0),
        ("extraction", extraction, device, 1024 if small else 16384, 2 if small else 12,
         16 if small else 256),
        ("scan", scan, device, 256 if small else 100_000),
        ("training_step", training_steps, device, 500 if small else 100_000, 60.0 if small else 90.0,
         "abmil,transmil" if small else "*"),
    ]  # fmt: skip
    for name, fn, *fn_args in stages:
        if name not in skip:
            _stage(results, name, fn, *fn_args)
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"[gpu_check] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
