"""Cost of the AEM and SC-MIL training objectives (one JSON line per case).

What is measured, per case in a fresh subprocess (so ``ru_maxrss`` is that case's peak RSS):
- ``aem``: one training step (forward + loss + backward) of ``aem-mha`` / ``aem-abmil`` on one bag
  of N instances, D = 1024, with λ = 0 (baseline), λ = 0.1 and λ = 0.1 + subsampling 0.5;
- ``scmil``: one training step of ``scmil-abmil`` on a padded batch of 8 bags (N_max = N, sizes
  N/2..N) against the same base (``abmil-gated``) trained with CE only.

Usage: ``python benchmarks/bench_aem_scmil.py [--sizes 1000,10000] [--repeats 5] [--device cpu]
[--models 'aem-*']``
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = [
    ("aem-mha", {"lamda": 0.0}),
    ("aem-mha", {"lamda": 0.1}),
    ("aem-mha", {"lamda": 0.1, "subsampling": 0.5}),
    ("aem-abmil", {"lamda": 0.0}),
    ("aem-abmil", {"lamda": 0.1}),
    ("aem-abmil", {"lamda": 0.1, "subsampling": 0.5}),
    ("abmil-gated", {"batch": 8}),
    ("scmil-abmil", {"batch": 8}),
]


def run_case(name: str, kwargs: dict, n: int, repeats: int, device: str) -> dict:
    """Time ``repeats`` training steps after one warm-up step; return the JSON record."""
    import torch
    from torch import nn

    from milkit import models

    torch.manual_seed(0)
    kwargs = dict(kwargs)
    batch = int(kwargs.pop("batch", 1))
    model = models.create(name, 1024, 2, **kwargs).to(device).train()
    x = torch.randn(batch, n, 1024, device=device)
    mask = None
    if batch > 1:
        sizes = torch.linspace(n // 2, n, batch).long().to(device)
        mask = torch.arange(n, device=device)[None, :] < sizes[:, None]
    labels = torch.arange(batch, device=device) % 2
    criterion = nn.CrossEntropyLoss()

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x, mask)
        loss, _ = model.training_loss({"label": labels, "mask": mask}, out, criterion)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step()
    times = [step() for _ in range(repeats)]
    return {
        "bench": "aem_scmil",
        "model": name,
        "kwargs": kwargs,
        "batch": batch,
        "n": n,
        "d": 1024,
        "device": device,
        "threads": torch.get_num_threads(),
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "step_ms_min": round(1000 * min(times), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated bag sizes N")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="*", help="shell pattern over model names")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one case
    args = parser.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        record = run_case(spec["name"], spec["kwargs"], spec["n"], args.repeats, args.device)
        print(json.dumps(record), flush=True)
        return 0
    failed = 0
    for n in (int(s) for s in args.sizes.split(",")):
        for name, kwargs in CASES:
            if not fnmatch.fnmatch(name, args.models):
                continue
            spec = json.dumps({"name": name, "kwargs": kwargs, "n": n})
            cmd = [sys.executable, __file__, "--one", spec, "--repeats", str(args.repeats),
                   "--device", args.device]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                failed += 1
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                print(json.dumps({"bench": "aem_scmil", "model": name, "n": n,
                                  "kwargs": kwargs, "error": tail[0]}), flush=True)  # fmt: skip
                continue
            print(proc.stdout.strip(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
