"""``milkit evaluate``: test metrics of a run, per fold and mean ± std (optional bootstrap CI)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EXAMPLE = """example:
  milkit evaluate --run runs/abmil
  milkit evaluate --run runs/abmil --bootstrap 1000 --json runs/abmil/evaluation.json

Recomputes the metrics from RUN/fold_<k>/predictions.csv (the test folds, predicted with each
fold's selected checkpoint) and prints AUC, accuracy, balanced accuracy and macro-F1 per fold and
as mean ± std over folds. --bootstrap adds a 95% CI of each fold's AUC and of the pooled AUC.
"""

_COLUMNS = ("auc", "accuracy", "balanced_accuracy", "f1_macro")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a trained run (per fold, mean ± std)",
        description="Score the test-fold predictions of a `milkit train` run.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (milkit train --out)")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples (e.g. 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.set_defaults(func=run_command)


def evaluate_run(run_dir: Path, *, bootstrap: int = 0, seed: int = 0) -> dict:
    """Per-fold metrics, their summary and (optionally) bootstrap CIs from predictions.csv."""
    import numpy as np
    import pandas as pd

    from milkit.cv import fold_dirs, load_run
    from milkit.errors import MilkitError
    from milkit.metrics import bootstrap_ci, classification_metrics, summarise_folds

    info = load_run(run_dir)
    names = [str(c) for c in info["class_names"]]
    index = {n: i for i, n in enumerate(names)}
    folds, ys, ps = [], [], []
    for d in fold_dirs(run_dir):
        path = d / "predictions.csv"
        if not path.is_file():
            continue
        frame = pd.read_csv(path, dtype={"slide_id": str, "label": str})
        cols = [f"prob_{n}" for n in names]
        missing = [c for c in ["label", *cols] if c not in frame.columns]
        if missing:
            raise MilkitError(f"predictions file lacks columns {missing}", path=path)
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise MilkitError("predictions hold labels outside the run's classes",
                              value=unknown[:5], path=path)  # fmt: skip
        y = frame["label"].map(index).to_numpy(dtype=np.int64)
        p = frame[cols].to_numpy(dtype=np.float64)
        m = classification_metrics(y, p, names)
        m["fold"] = int(d.name[5:])
        if bootstrap > 0:
            m["auc_ci"] = list(bootstrap_ci(y, p, "auc", n_boot=bootstrap, seed=seed))
        folds.append(m)
        ys.append(y)
        ps.append(p)
    if not folds:
        raise MilkitError("run has no test predictions (fold_<k>/predictions.csv)", path=run_dir,
                          hint="Finish training first: milkit train ... --resume")  # fmt: skip
    summary = summarise_folds([{k: m[k] for k in _COLUMNS} for m in folds])
    out = {"model_name": info.get("model_name"), "class_names": names, "folds": folds,
           "summary": summary}  # fmt: skip
    if bootstrap > 0:
        y_all, p_all = np.concatenate(ys), np.concatenate(ps)
        out["pooled_auc"] = classification_metrics(y_all, p_all, names)["auc"]
        out["pooled_auc_ci"] = list(bootstrap_ci(y_all, p_all, "auc", n_boot=bootstrap, seed=seed))
    return out


def _fmt(v: float) -> str:
    return "  n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def run_command(args: argparse.Namespace) -> int:
    import warnings

    from milkit.atomic import atomic_write_text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class folds: AUC n/a, shown in the table
        res = evaluate_run(args.run, bootstrap=args.bootstrap, seed=args.seed)
    header = f"{'fold':>5}  {'n':>4}  " + "  ".join(f"{c:>17}" for c in _COLUMNS)
    print(f"{res['model_name']}  ({args.run})")
    print(header)
    for m in res["folds"]:
        cells = [_fmt(m[c]) for c in _COLUMNS]
        if "auc_ci" in m:
            cells[0] = f"{_fmt(m['auc'])} [{_fmt(m['auc_ci'][0])},{_fmt(m['auc_ci'][1])}]"
        print(f"{m['fold']:>5}  {m['n']:>4}  " + "  ".join(f"{c:>17}" for c in cells))
    s = res["summary"]
    cells = [f"{_fmt(s[c]['mean'])} ± {_fmt(s[c]['std'])}" for c in _COLUMNS]
    print(f"{'mean':>5}  {'':>4}  " + "  ".join(f"{c:>17}" for c in cells))
    if "pooled_auc_ci" in res:
        lo, hi = res["pooled_auc_ci"]
        print(f"pooled AUC {_fmt(res['pooled_auc'])} (95% bootstrap CI {_fmt(lo)}-{_fmt(hi)})")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0
