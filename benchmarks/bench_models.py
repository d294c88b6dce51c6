"""Training-step cost of every registered aggregator: forward + backward time and peak memory.

One JSON line per (model, N). Each case runs in a FRESH subprocess so that its peak memory
(``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own; ``rss_base_mb``
is the process size before the step (interpreter + torch + model + input), so
``peak_mb - rss_base_mb`` is what the step itself needed.

Examples:
    python benchmarks/bench_models.py                         # all models, N = 1e3, 1e4, 1e5
    python benchmarks/bench_models.py --models 'abmil*' --sizes 10000 --compare-torchmil
    python benchmarks/bench_models.py --models transmil,mhim-abmil --device cuda
    python benchmarks/bench_models.py --models clam-sb,clam-mb,dsmil --sizes 100000 \
        --repeats 1 --max-rss-gb 8                            # memory at scale (CPU)

``--max-rss-gb`` adds ``under_limit`` (peak RSS ≤ the limit) to each record and makes the exit
status 1 when a case exceeds it. The cases run one after another, never in parallel.

``--compare-torchmil`` adds the configuration torchmil's ABMIL uses (no embedding layer,
attention 1024→128→1, plain and gated; torchmil defaults) both as milkit ``abmil`` with
overrides and as a direct implementation of the same equations in plain torch ops, so the
comparison does not depend on torchmil being installed. When the torchmil package is installed
it also times the real ``torchmil.models.ABMIL`` (plain and gated, its defaults: att_dim 128,
BCE on one logit, ``compute_loss``) as ``torchmil-pkg-abmil[-gated]``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

REPO = Path(__file__).resolve().parent.parent
REF_PREFIX = "ref-torchmil-abmil"
PKG_PREFIX = "torchmil-pkg-abmil"  # the real torchmil package, when installed
# milkit abmil in the torchmil ABMIL configuration (att_dim 128, no feature extractor).
TORCHMIL_CASES = {
    "abmil[torchmil-config]": ("abmil", {"fc_dim": None, "attn_dim": 128, "attn_dropout": 0.0}),
    "abmil-gated[torchmil-config]": (
        "abmil-gated",
        {"fc_dim": None, "attn_dim": 128, "attn_dropout": 0.0},
    ),
}


def _reference_torchmil_abmil(in_dim: int, gated: bool) -> nn.Module:
    """torchmil ABMIL's equations in plain torch: tanh(V x) [⊙ sigmoid(U x)], w, softmax,
    pooled bag, one linear logit (BCE); separate V and U Linears, as torchmil has them."""
    import torch
    from torch import nn

    class Ref(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Linear(in_dim, 128)
            self.u = nn.Linear(in_dim, 128) if gated else None
            self.w = nn.Linear(128, 1, bias=False)
            self.cls = nn.Linear(in_dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.tanh(self.v(x))
            if self.u is not None:
                a = a * torch.sigmoid(self.u(x))
            att = self.w(a).squeeze(-1).softmax(-1)
            return self.cls(torch.bmm(att.unsqueeze(1), x).squeeze(1))

    return Ref()


def run_one(name: str, n: int, args: argparse.Namespace) -> dict:
    """Time one training step configuration in this process."""
    import torch
    from torch import nn

    from milkit import models

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    if name.startswith(REF_PREFIX):
        model = _reference_torchmil_abmil(args.dim, gated=name.endswith("gated"))
    elif name.startswith(PKG_PREFIX):
        from torchmil.models import ABMIL

        model = ABMIL(in_shape=(args.dim,), gated=name.endswith("gated"))
    elif name in TORCHMIL_CASES:
        base, overrides = TORCHMIL_CASES[name]
        model = models.create(base, args.dim, args.classes, **overrides)
    else:
        model = models.create(name, args.dim, args.classes)
    model = model.to(device).train()
    x = torch.randn(1, n, args.dim, device=device)
    label = torch.zeros(1, dtype=torch.long, device=device)
    batch = {"features": x, "mask": None, "coords": None, "label": label, "slide_id": ["b"]}
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if name.startswith(PKG_PREFIX):
            _, losses = model.compute_loss(label, x)
            loss = sum(losses.values())
        elif name.startswith(REF_PREFIX):
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(x).squeeze(-1), label.float()
            )
        else:
            out = model(x)
            loss, _ = model.training_loss(batch, out, criterion)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    record = {
        "model": name,
        "n": n,
        "dim": args.dim,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "ms_median": round(statistics.median(times), 2),
        "ms_min": round(min(times), 2),
        "repeats": len(times),
        "rss_base_mb": round(rss_base, 1),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="*", help="comma-separated names or patterns")
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--compare-torchmil", action="store_true")
    parser.add_argument(
        "--max-rss-gb", type=float, default=None, help="fail a case whose peak RSS exceeds this"
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    from milkit import models

    patterns = [p.strip() for p in args.models.split(",") if p.strip()]
    names = [m for m in models.list_models() if any(fnmatch.fnmatch(m, p) for p in patterns)]
    if args.compare_torchmil:
        names += [f"{REF_PREFIX}", f"{REF_PREFIX}-gated", *TORCHMIL_CASES]
        import importlib.util

        if importlib.util.find_spec("torchmil") is not None:
            names += [PKG_PREFIX, f"{PKG_PREFIX}-gated"]
    sizes = [int(s) for s in args.sizes.split(",")]
    passthrough = [
        f"--dim={args.dim}",
        f"--classes={args.classes}",
        f"--repeats={args.repeats}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--device={args.device}",
    ]
    failed = 0
    for name in names:
        for n in sizes:
            cmd = [sys.executable, __file__, "--one", name, str(n), *passthrough]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=env
                )
            except subprocess.TimeoutExpired:
                print(json.dumps({"model": name, "n": n, "error": f"timeout {args.timeout}s"}))
                failed += 1
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                print(json.dumps({"model": name, "n": n, "error": err}))
                failed += 1
                continue
            record = json.loads(lines[-1])
            if args.max_rss_gb is not None:
                record["max_rss_gb"] = args.max_rss_gb
                record["under_limit"] = record["peak_mb"] <= args.max_rss_gb * 1024
                failed += 0 if record["under_limit"] else 1
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
