"""Tiny-bag training speed: milkit's trainer beside a plain PyTorch loop doing the same steps.

Setting (issue 9, fault 9): 200 bags of 4-10 instances (mean 7) × 230 features, two classes,
ABMIL with its defaults, batch 1, AdamW, written as HDF5 bags like ``milkit preprocess`` output.

1. ``steps_per_s``: ``--folds`` × ``--epochs`` of ``milkit.training.cv.cross_validate`` (what ``milkit
   train`` runs: inner validation every epoch, checkpoints, logs, test predictions) beside a plain
   PyTorch loop over the same folds (same model, optimiser settings and bags, already in memory;
   per epoch one pass over the training bags and one forward pass over the validation bags), the
   plain loop with 1 and with 2 intra-op threads (the better one is the reference; 2 threads are
   timed on 2 epochs only, as they are many times slower on a loaded machine). Steps are training
   steps (one bag each). The shared machine's load changes by the second, so the plain loop and
   milkit alternate for ``--rounds`` rounds and the best round of each is compared.
   ``milkit_steps_per_s`` counts the whole ``cross_validate`` (test predictions, ROC plots, files
   included); ``epochs_only_steps_per_s`` only its epochs (training + validation, as the plain
   loop) from the fold logs. One-off imports (scikit-learn, SciPy, matplotlib, torch._dynamo)
   are done before timing, for both.
   (This comparison stays below the size at which milkit trains folds side by side, so both
   sides run in one process.)
2. ``full_run``: ``python -m milkit train --folds 10 --epochs 50`` on the cohort with milkit's
   defaults (one thread per fold, folds side by side on the cores), wall time of the whole command
   (interpreter start-up and imports included). Goal: under 2 minutes on 2 cores.

Prints one JSON line per measurement and the 1-minute load average before each (the development
machine is shared). ``--skip-full`` leaves out part 2.

    python benchmarks/bench_tiny_training.py
    python benchmarks/bench_tiny_training.py --folds 2 --epochs 5 --skip-full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cohort(root: Path, n_bags: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """HDF5 bags + labels.csv: positive bags hold one instance shifted along features 0-7."""
    import pandas as pd

    from milkit.io.bags import write_bag

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_bags):
        n = int(rng.integers(4, 11))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        label = i % 2
        if label:
            x[0, :8] += 2.0
        coords = np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], 1)
        write_bag(root / "bags" / f"s{i:03d}.h5", x, coords)
        rows.append({"slide_id": f"s{i:03d}", "label": ["neg", "pos"][label]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "bags"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def warm_imports() -> None:
    """Process-wide one-off costs, paid before any timing."""
    import matplotlib.figure  # noqa: F401  (ROC plots)
    import scipy.stats  # noqa: F401  (bootstrap / per-epoch AUC ranks)
    import sklearn.metrics  # noqa: F401
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo


def milkit_run(table, folds: int, epochs: int, out: Path) -> dict:
    import shutil
    import warnings

    from milkit.training.config import TrainConfig
    from milkit.training.cv import cross_validate

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(epochs=epochs, progress=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-validation-set warnings
        res = cross_validate(table, "abmil", cfg, out, folds=folds)
    wall = time.perf_counter() - t0
    steps = sum(m["epochs_run"] * m["n_train"] for m in res.folds)
    # Trainer epochs alone (training + validation pass, as the plain loop), from the fold logs
    fit_s = 0.0
    for m in res.folds:
        log = (out / f"fold_{m['fold']}" / "log.jsonl").read_text().splitlines()
        fit_s += sum(json.loads(line)["time_s"] for line in log)
    return {"steps": steps, "wall_s": round(wall, 2), "steps_per_s": round(steps / wall, 1),
            "epochs_only_steps_per_s": round(steps / fit_s, 1),
            "threads_used": "auto (milkit.runtime.threads)"}  # fmt: skip


def plain_run(table, splits, epochs: int, threads: int) -> dict:
    """The same folds in a bare loop: forward, cross-entropy, backward, AdamW step; val pass."""
    import torch

    from milkit import models
    from milkit.data.datasets import BagDataset

    torch.set_num_threads(threads)

    def tensors(ids):
        ds = BagDataset.from_table(table, ids)
        items = [ds[i] for i in range(len(ds))]
        return [it["features"][None] for it in items], [torch.tensor([it["label"]]) for it in items]

    steps, wall = 0, 0.0
    for split in splits:
        xs, ys = tensors(split.train)
        vx, vy = tensors(split.val)
        torch.manual_seed(0)
        model = models.create("abmil", table.in_dim, 2)
        # the best plain setting on CPU: the fused AdamW kernel
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-5, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for _ in range(epochs):
            model.train()
            for i in torch.randperm(len(xs)).tolist():
                loss = loss_fn(model(xs[i]).logits, ys[i])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            model.eval()
            with torch.inference_mode():
                val_loss = sum(float(loss_fn(model(x).logits, y)) for x, y in zip(vx, vy))
        wall += time.perf_counter() - t0
        del val_loss
    return {"threads": threads, "steps": steps, "wall_s": round(wall, 2),
            "steps_per_s": round(steps / wall, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=200)
    ap.add_argument("--dim", type=int, default=230)
    ap.add_argument("--folds", type=int, default=2, help="folds of the steps/s comparison")
    ap.add_argument("--epochs", type=int, default=50, help="epochs of the steps/s comparison")
    ap.add_argument("--rounds", type=int, default=2, help="alternating plain/milkit rounds")
    ap.add_argument("--skip-full", action="store_true", help="skip the 10-fold × 50-epoch run")
    args = ap.parse_args()

    import torch

    from milkit.data.labels import load_labels
    from milkit.data.splits import make_cv_splits

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv, bags = make_cohort(root, args.bags, args.dim)
        table = load_labels(csv, bags)
        splits = make_cv_splits(table, folds=args.folds, seed=0)
        setting = {"bags": args.bags, "dim": args.dim, "folds": args.folds,
                   "epochs": args.epochs, "cpus": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
        default_threads = torch.get_num_threads()
        warm_imports()
        plain = [{"load_1min": load(), **plain_run(table, splits, 2, threads=2)}]
        print(json.dumps({"bench": "plain_loop", **setting, "epochs": 2, **plain[-1]}), flush=True)
        runs = []
        for _ in range(args.rounds):
            plain.append({"load_1min": load(), **plain_run(table, splits, args.epochs, 1)})
            print(json.dumps({"bench": "plain_loop", **setting, **plain[-1]}), flush=True)
            torch.set_num_threads(default_threads)  # milkit chooses its own
            runs.append({"load_1min": load(), **milkit_run(table, args.folds, args.epochs,
                                                             root / "run")})  # fmt: skip
            print(json.dumps({"bench": "milkit_cv", **setting, **runs[-1]}), flush=True)
        best = max(plain, key=lambda r: r["steps_per_s"])
        mk = max(runs, key=lambda r: r["steps_per_s"])
        ratio = best["steps_per_s"] / mk["steps_per_s"]
        print(json.dumps({"bench": "tiny_training_ratio", "plain_best_threads": best["threads"],
                          "plain_steps_per_s": best["steps_per_s"],
                          "milkit_steps_per_s": mk["steps_per_s"],
                          "plain_over_milkit": round(ratio, 2),
                          "plain_over_milkit_epochs_only": round(
                              best["steps_per_s"] / mk["epochs_only_steps_per_s"], 2),
                          "goal": "<= 1.5"}), flush=True)  # fmt: skip

        if not args.skip_full:
            cmd = [sys.executable, "-m", "milkit", "train", "--bags", str(bags), "--labels",
                   str(csv), "--model", "abmil", "--folds", "10", "--epochs", "50",
                   "--out", str(root / "full"), "--no-progress", "--device", "cpu"]  # fmt: skip
            before = load()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(("auc", "accuracy"))]
            print(json.dumps({"bench": "full_run", "command": "milkit train --folds 10 --epochs 50",
                              "bags": args.bags, "returncode": proc.returncode,
                              "wall_s": round(wall, 1), "goal_s": 120, "load_1min_before": before,
                              "load_1min_after": load(), "summary": summary,
                              "stderr_tail": proc.stderr[-300:] if proc.returncode else ""}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
