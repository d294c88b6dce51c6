"""``milkit evaluate``: test metrics of a run, per fold and mean ± std (optional bootstrap CI)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit evaluate --run runs/abmil
  milkit evaluate --run runs/abmil --bootstrap 1000 --json runs/abmil/evaluation.json

Recomputes the metrics from RUN/fold_<k>/predictions.csv (the test folds, predicted with each
fold's selected checkpoint) and prints AUC, accuracy, balanced accuracy and macro-F1 per fold, as
mean ± std over folds, and pooled over all test predictions (out-of-fold). Binary AUC is the
positive class's; with more classes it is the macro average of one-vs-rest AUCs ("auc (macro
OvR)"). --bootstrap adds a 95% CI of each fold's AUC and of the pooled AUC; a fold with fewer than
5 slides of a class gets a note instead of an interval.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a trained run (per fold, mean ± std)",
        description="Score the test-fold predictions of a `milkit train` run.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (milkit train --out)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="bootstrap resamples for 95%% CIs (default 0: none; e.g. 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.set_defaults(func=run_command)


def _fmt(v: float) -> str:
    from milkit.training.metrics import format_number

    return format_number(v).rjust(5)  # "  n/a" lines up with "0.912"


def run_command(args: argparse.Namespace) -> int:
    import warnings

    from milkit.evaluation.evaluate import COLUMNS as _COLUMNS
    from milkit.evaluation.evaluate import evaluate_run
    from milkit.io.atomic import atomic_write_json
    from milkit.training.metrics import auc_label

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class folds: AUC n/a, shown in the table
        res = evaluate_run(args.run, bootstrap=args.bootstrap, seed=args.seed)
    titles = [auc_label(res["class_names"]), *_COLUMNS[1:]]
    header = f"{'fold':>6}  {'n':>4}  " + "  ".join(f"{c:>17}" for c in titles)
    print(f"{res['model_name']}  ({args.run}); auc: {res['auc_average']}")
    print(header)
    notes = []
    for m in res["folds"]:
        cells = [_fmt(m[c]) for c in _COLUMNS]
        if m.get("auc_ci"):
            cells[0] = f"{_fmt(m['auc'])} [{_fmt(m['auc_ci'][0])},{_fmt(m['auc_ci'][1])}]"
        elif m.get("auc_ci_note"):
            notes.append(f"fold {m['fold']}: {m['auc_ci_note']}")
        print(f"{m['fold']:>6}  {m['n']:>4}  " + "  ".join(f"{c:>17}" for c in cells))
    s = res["summary"]
    cells = [f"{_fmt(s[c]['mean'])} ± {_fmt(s[c]['std'])}" for c in _COLUMNS]
    print(f"{'mean':>6}  {'':>4}  " + "  ".join(f"{c:>17}" for c in cells))
    pooled = res["pooled"]
    cells = [_fmt(pooled[c]) for c in _COLUMNS]
    if "pooled_auc_ci" in res:
        lo, hi = res["pooled_auc_ci"]
        cells[0] = f"{_fmt(pooled['auc'])} [{_fmt(lo)},{_fmt(hi)}]"
    elif pooled.get("auc_ci_note"):
        notes.append(f"pooled: {pooled['auc_ci_note']}")
    print(f"{'pooled':>6}  {pooled['n']:>4}  " + "  ".join(f"{c:>17}" for c in cells))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        atomic_write_json(args.json, res)
    return 0
