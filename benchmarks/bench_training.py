"""Training throughput: epoch time and peak memory of the milkit Trainer on large bags (CPU).

Setting (issue 4): 200 bags of 10^4 instances × 1024 features, batch 1, AdamW, one epoch, for
``abmil`` and ``transmil`` (when registered). 200 distinct bags would take 8 GB; the dataset
instead cycles over ``--distinct`` in-memory bags (default 8), so data loading costs ~0 and the
numbers measure the training step (forward, backward, optimiser) through ``Trainer.fit``.
``epoch_s`` is the last epoch's time (steady state; the first includes one-off warm-up).

Each model runs in a fresh child process so that peak RSS (``ru_maxrss``) is its own.
Prints one JSON line per model.

    python benchmarks/bench_training.py                       # the issue's setting
    python benchmarks/bench_training.py --bags 20 --models abmil transmil --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


class CyclingBags:
    """``n`` items drawn from ``distinct`` fixed random bags (labels alternate)."""

    def __init__(self, n: int, instances: int, dim: int, distinct: int, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.bags = [torch.randn(instances, dim, generator=g) for _ in range(distinct)]
        self.labels = np.arange(n) % 2
        self.slide_ids = [f"bag{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.bags[i % len(self.bags)], "coords": None,
                "label": int(self.labels[i]), "slide_id": self.slide_ids[i]}  # fmt: skip


def child(
    model_name: str, bags: int, instances: int, dim: int, distinct: int, threads: int, epochs: int
) -> dict:
    import torch

    from milkit import models
    from milkit.training.config import TrainConfig
    from milkit.training.trainer import fit_model

    torch.set_num_threads(threads)
    data = CyclingBags(bags, instances, dim, distinct)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = models.create(model_name, dim, 2)
    # The first optimiser imports torch._dynamo (seconds); keep that out of the timing.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    cfg = TrainConfig(epochs=epochs, progress=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    res = fit_model(model, data, cfg)
    total_s = time.perf_counter() - t0
    epoch_times = [float(h["time_s"]) for h in res.history]
    epoch_s = epoch_times[-1]  # steady state: the last epoch
    return {
        "bench": "training_epoch",
        "model": model_name,
        "bags": bags,
        "instances": instances,
        "dim": dim,
        "distinct_bags_in_memory": distinct,
        "threads": threads,
        "epochs": epochs,
        "epoch_s": round(epoch_s, 2),
        "epoch_times_s": epoch_times,
        "fit_total_s": round(total_s, 2),
        "s_per_bag": round(epoch_s / bags, 4),
        "train_loss_last_epoch": round(res.history[-1]["train_loss"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_rss_mb": round(rss_data, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["abmil", "transmil"])
    p.add_argument("--bags", type=int, default=200)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--distinct", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last one is reported")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = child(args.child, args.bags, args.instances, args.dim, args.distinct, args.threads,
                    args.epochs)  # fmt: skip
        print(json.dumps(res), flush=True)
        return
    from milkit import models

    registered = set(models.list_models())
    for name in args.models:
        if name not in registered:
            print(
                json.dumps({"bench": "training_epoch", "model": name, "skipped": "not registered"})
            )
            continue
        cmd = [sys.executable, __file__, "--child", name, "--bags", str(args.bags),
               "--instances", str(args.instances), "--dim", str(args.dim),
               "--distinct", str(args.distinct), "--threads", str(args.threads),
               "--epochs", str(args.epochs)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            print(json.dumps({"bench": "training_epoch", "model": name,
                              "error": out.stderr.strip().splitlines()[-1:]}))  # fmt: skip
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
