"""Slide-level classification metrics, fold summaries, bootstrap intervals, ROC plots (DESIGN §6).

AUC is the AUC of the positive class for binary tasks and the macro average of one-vs-rest AUCs
for multiclass tasks (scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")``,
computed per class here so that probabilities need not sum exactly to one). A class absent from
``y_true`` makes the AUC undefined: it is reported as NaN with a warning instead of crashing an
evaluation fold.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milkit.atomic import atomic_path
from milkit.errors import MilkitError

SCALAR_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro")


def _check_inputs(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise MilkitError(
            f"probs must have shape (n, C) with n = len(y_true) = {y.shape[0]}", value=p.shape
        )
    if p.shape[1] < 2:
        raise MilkitError("probs need at least two class columns", value=p.shape)
    if num_classes is not None and p.shape[1] != num_classes:
        raise MilkitError(
            f"probs have {p.shape[1]} columns but {num_classes} class names", value=p.shape
        )
    if y.size == 0:
        raise MilkitError("cannot compute metrics on zero samples", value=0)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise MilkitError(
            f"y_true must hold class indices in [0, {p.shape[1]})",
            value=(int(y.min()), int(y.max())),
        )
    if not np.isfinite(p).all():
        raise MilkitError("probs contain NaN or inf", value=int((~np.isfinite(p)).sum()))
    return y, p


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Equal to ``sklearn.metrics.roc_auc_score`` and ~50x faster, which matters for bootstraps.
    """
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auc(y: np.ndarray, p: np.ndarray, *, warn: bool = True) -> float:
    """Binary: AUC of class 1. Multiclass: macro one-vs-rest AUC. NaN if a class is absent."""
    num_classes = p.shape[1]
    present = np.bincount(y, minlength=num_classes) > 0
    if not present.all():
        if warn:
            warnings.warn(
                f"AUC is undefined: class(es) {np.flatnonzero(~present).tolist()} do not occur in "
                "y_true; reporting nan",
                RuntimeWarning,
                stacklevel=3,
            )
        return math.nan
    if num_classes == 2:
        return _binary_auc(y == 1, p[:, 1])
    return float(np.mean([_binary_auc(y == k, p[:, k]) for k in range(num_classes)]))


def _scalar(name: str, y: np.ndarray, p: np.ndarray, *, warn: bool = True) -> float:
    """One scalar metric; numpy formulas equal to scikit-learn's (tested against it)."""
    num_classes = p.shape[1]
    if name == "auc":
        return _auc(y, p, warn=warn)
    pred = p.argmax(axis=1)
    if name == "accuracy":
        return float(np.mean(pred == y))
    cm = np.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    if name == "balanced_accuracy":
        # mean recall over the classes present in y_true (= sklearn balanced_accuracy_score)
        present = support > 0
        return float(np.mean(tp[present] / support[present]))
    if name == "f1_macro":
        # F1 = 2TP / (2TP + FP + FN), 0 where undefined (sklearn zero_division=0), all classes
        denom = support + cm.sum(axis=0)
        f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
        return float(f1.mean())
    raise MilkitError(f"unknown metric; choose one of {list(SCALAR_METRICS)}", value=name)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Slide-level metrics from true class indices and predicted class probabilities.

    Returns ``auc``, ``accuracy``, ``balanced_accuracy``, ``f1_macro`` (over all classes, absent
    ones scoring 0), ``confusion_matrix`` (rows = true class, columns = predicted, as lists),
    ``auc_per_class`` (one-vs-rest, NaN for absent classes), ``class_names`` and ``n``.
    Predictions are the arg-max class.
    """
    from sklearn.metrics import confusion_matrix

    names = [str(c) for c in class_names]
    y, p = _check_inputs(y_true, probs, len(names))
    out: dict[str, Any] = {name: _scalar(name, y, p) for name in SCALAR_METRICS}
    per_class = {}
    for k, name in enumerate(names):
        positive = y == k
        defined = positive.any() and not positive.all()
        per_class[name] = _binary_auc(positive, p[:, k]) if defined else math.nan
    out["auc_per_class"] = per_class
    out["confusion_matrix"] = confusion_matrix(
        y, p.argmax(axis=1), labels=np.arange(len(names))
    ).tolist()
    out["class_names"] = names
    out["n"] = int(y.size)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def summarise_folds(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation across folds of every scalar metric.

    Returns ``{metric: {"mean": m, "std": s, "n": folds with a finite value}}`` for each key whose
    values are numbers (``n``, ``fold``, strings and lists are skipped). NaN or missing values (an
    undefined AUC, a fold without the key) are left out of that metric's mean. ``std`` is the sample standard deviation (ddof = 1; 0 for one fold),
    as reported as mean ± std in the MIL literature.
    """
    if not fold_metrics:
        raise MilkitError("no fold metrics to summarise", value=0)
    keys: list[str] = []
    for m in fold_metrics:
        for key, value in m.items():
            if key not in ("n", "fold") and key not in keys and _is_number(value):
                keys.append(key)
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array(
            [float(v) if _is_number(v := m.get(key)) else math.nan for m in fold_metrics],
            dtype=np.float64,
        )
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            summary[key] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        summary[key] = {"mean": float(finite.mean()), "std": std, "n": int(finite.size)}
    return summary


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "auc",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (1 - alpha) of a metric over slides.

    Slides are resampled with replacement ``n_boot`` times; resamples where the metric is
    undefined (e.g. a single class for AUC) are skipped. ``metric`` is a name from
    ``SCALAR_METRICS`` or a callable ``(y_true, probs) -> float``. Returns (nan, nan) if no
    resample gives a value.
    """
    y, p = _check_inputs(y_true, probs)
    if n_boot < 1:
        raise MilkitError("n_boot must be >= 1", value=n_boot)
    if not 0.0 < alpha < 1.0:
        raise MilkitError("alpha must be in (0, 1)", value=alpha)
    if callable(metric):
        fn = metric
    else:
        if metric not in SCALAR_METRICS:
            raise MilkitError(f"unknown metric; choose one of {list(SCALAR_METRICS)}", value=metric)

        def fn(yy: np.ndarray, pp: np.ndarray) -> float:
            return _scalar(metric, yy, pp, warn=False)

    rng = np.random.default_rng(seed)
    n = y.size
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        v = fn(y[idx], p[idx])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return (math.nan, math.nan)
    low, high = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """ROC curve(s) as a PNG (atomic): the positive class for binary tasks, one-vs-rest per
    class for multiclass tasks; the legend shows each AUC. Absent classes are skipped."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    from sklearn.metrics import roc_auc_score, roc_curve

    names = [str(c) for c in class_names]
    y, p = _check_inputs(y_true, probs, len(names))
    classes = [1] if len(names) == 2 else list(range(len(names)))
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for k in classes:
        positive = y == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        auc = roc_auc_score(positive, p[:, k])
        label = f"{names[k]} (AUC = {auc:.3f})"
        ax.plot(fpr, tpr, linewidth=2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title or ("ROC" if len(names) == 2 else "ROC (one-vs-rest)"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return out


__all__ = [
    "SCALAR_METRICS",
    "bootstrap_ci",
    "classification_metrics",
    "plot_roc",
    "summarise_folds",
]
