"""Run-level evaluation: the test metrics of a finished run, per fold, mean ± std and pooled.

``milkit evaluate`` prints them; the numbers come from the saved out-of-fold predictions, so a
run is evaluated without its models or bags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from milkit.errors import MilkitError

COLUMNS = ("auc", "accuracy", "balanced_accuracy", "f1_macro")  # summarised over folds


def evaluate_run(run_dir: str | Path, *, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Per-fold metrics, their mean ± std, the pooled out-of-fold metrics and (optionally)
    bootstrap 95% CIs of the AUC, recomputed from the run's ``fold_<k>/predictions.csv``.

    Returns a dict with ``folds`` (one metrics dict per fold, with ``fold`` and, with
    ``bootstrap``, ``auc_ci`` or ``auc_ci_note``), ``summary`` (mean/std of ``COLUMNS``),
    ``pooled`` and ``pooled_auc`` (+ ``pooled_auc_ci``), ``class_names``, ``auc_average``.

    Raises:
        MilkitError: not a run folder, or no fold has predictions yet.
    """
    from milkit.io.runs import load_run, read_fold_predictions
    from milkit.training.metrics import (
        auc_ci,
        classification_metrics,
        pooled_metrics,
        summarise_folds,
    )

    info = load_run(run_dir)
    names = [str(c) for c in info["class_names"]]
    folds, ys, ps = [], [], []
    for fold, y, p in read_fold_predictions(run_dir, names):
        m = classification_metrics(y, p, names)
        m["fold"] = fold
        if bootstrap > 0:
            ci = auc_ci(y, p, n_boot=bootstrap, seed=seed)
            m["auc_ci"] = [ci["auc_ci_low"], ci["auc_ci_high"]] if "auc_ci_low" in ci else None
            m["auc_ci_note"] = ci.get("auc_ci_note")
        folds.append(m)
        ys.append(y)
        ps.append(p)
    if not folds:
        raise MilkitError("run has no test predictions (fold_<k>/predictions.csv)", path=run_dir,
                          hint="Finish training first: milkit train ... --resume")  # fmt: skip
    summary = summarise_folds([{k: m[k] for k in COLUMNS} for m in folds])
    pooled = pooled_metrics(ys, ps, names, bootstrap=bootstrap, seed=seed)
    out = {"model_name": info.get("model_name"), "class_names": names,
           "auc_average": pooled["auc_average"], "folds": folds, "summary": summary,
           "pooled": pooled, "pooled_auc": pooled["auc"]}  # fmt: skip
    if "auc_ci_low" in pooled:
        out["pooled_auc_ci"] = [pooled["auc_ci_low"], pooled["auc_ci_high"]]
    return out
