"""Time and peak memory of the pure-PyTorch selective scan, MambaMIL and R2T-MIL (fwd + bwd).

Each case runs in a fresh subprocess so ``ru_maxrss`` (peak resident memory) belongs to that case
alone; ``base_rss_mb`` is the peak before the forward pass (interpreter, torch, inputs, model), so
``peak_rss_mb - base_rss_mb`` is what the forward and backward passes added. Prints one JSON line
per case.

Usage::

    python benchmarks/bench_scan.py                      # scan, mambamil, r2t at N = 1e3, 1e4
    python benchmarks/bench_scan.py --lengths 1000,10000,100000 --cases scan --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _child(case: str, length: int, dim: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    record: dict = {"bench": case, "N": length, "threads": threads}
    if case == "scan":
        from milkit.models.layers.selective_scan import selective_scan_chunked

        d, n = 1024, 16
        u = torch.randn(1, d, length, requires_grad=True)
        delta = torch.randn(1, d, length, requires_grad=True)
        a = (-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)).requires_grad_()
        b = torch.randn(1, n, length, requires_grad=True)
        c = torch.randn(1, n, length, requires_grad=True)
        record.update(d_inner=d, d_state=n)
        base = _rss_mb()
        c0, t0 = time.process_time(), time.perf_counter()
        y = selective_scan_chunked(u, delta, a, b, c, delta_softplus=True)
        t1 = time.perf_counter()
        y.sum().backward()
    else:
        from milkit import models

        name = {"mambamil": "mambamil", "r2t": "r2t-abmil"}[case]
        model = models.create(name, dim, 2)
        x = torch.randn(1, length, dim)
        record.update(model=name, in_dim=dim)
        base = _rss_mb()
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
    t2 = time.perf_counter()
    record.update(
        cpu_s=round(time.process_time() - c0, 3),  # CPU time of fwd + bwd: less load-dependent
        fwd_s=round(t1 - t0, 3),
        bwd_s=round(t2 - t1, 3),
        base_rss_mb=round(base, 1),
        peak_rss_mb=round(_rss_mb(), 1),
    )
    record["added_mb"] = round(record["peak_rss_mb"] - record["base_rss_mb"], 1)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="scan,mambamil,r2t")
    parser.add_argument("--lengths", default="1000,10000")
    parser.add_argument("--dim", type=int, default=1024, help="feature dim D for the models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.dim, args.threads)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    failed = 0
    for case in args.cases.split(","):
        for length in (int(v) for v in args.lengths.split(",")):
            cmd = [sys.executable, __file__, "--child", case, str(length)]
            cmd += ["--dim", str(args.dim), "--threads", str(args.threads)]
            try:
                proc = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=args.timeout
                )
            except subprocess.TimeoutExpired:
                print(json.dumps({"bench": case, "N": length, "error": "timeout"}))
                failed += 1
                continue
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                print(json.dumps({"bench": case, "N": length, "error": tail[0]}))
                failed += 1
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
