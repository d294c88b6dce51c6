"""Slide-level classification metrics, fold summaries, bootstrap intervals, ROC plots (docs/architecture.md §5).

AUC is the AUC of the positive class (class index 1) for binary tasks and the macro average of
one-vs-rest AUCs for multiclass tasks (scikit-learn's ``roc_auc_score(multi_class="ovr",
average="macro")``, computed per class here so that probabilities need not sum exactly to one);
``classification_metrics`` names the averaging in ``auc_average`` and ``auc_label`` gives the
column title. A class absent from ``y_true`` makes the AUC undefined: it is reported as NaN with a
warning instead of crashing an evaluation fold.

Every AUC in milkit comes from this module: point estimates from scikit-learn
(``binary_auc``); bootstrap resamples from ``auc_rows``, the same Mann-Whitney statistic on a
whole (resamples × slides) matrix at once (one scikit-learn call costs ~3-5 ms, so 1000 resamples
would take seconds; ``auc_rows`` is tested equal to scikit-learn, ties included).

Small test sets: a percentile bootstrap over a handful of slides gives intervals such as
[1.000, 1.000] that look surer than they are. ``auc_ci`` therefore gives no interval (a note
instead) when a class has fewer than ``MIN_CI_PER_CLASS`` slides or every resample gives the same
value; report the pooled out-of-fold AUC (``pooled_metrics``) for such cohorts.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_path

SCALAR_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro")
MIN_CI_PER_CLASS = 5  # fewer slides of a class: no bootstrap CI (see the module docstring)


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


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary task (``sklearn.metrics.roc_auc_score``); NaN when a class is absent.

    Args:
        positive: (n,) bool, True for the positive slides.
        score: (n,) higher means more positive.
    """
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, np.asarray(score, dtype=np.float64)))


def auc_rows(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Row-wise binary AUC of (R, n) matrices (Mann-Whitney U, ties count one half).

    Equal to ``binary_auc`` on every row (tested), NaN for a row with one class; used for
    bootstrap resamples, where it replaces R scikit-learn calls with one ranking pass.
    """
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if positive.ndim == 1:
        positive, score = positive[None, :], score[None, :]
    ranks = rankdata(score, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


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
        return binary_auc(y == 1, p[:, 1])
    return float(np.mean([binary_auc(y == k, p[:, k]) for k in range(num_classes)]))


def _scalar(name: str, y: np.ndarray, p: np.ndarray, *, warn: bool = True) -> float:
    """One scalar metric, computed by scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    num_classes = p.shape[1]
    if name == "auc":
        return _auc(y, p, warn=warn)
    pred = p.argmax(axis=1)
    if name == "accuracy":
        return float(accuracy_score(y, pred))
    if name == "balanced_accuracy":
        # mean recall over the classes present in y_true (= balanced_accuracy_score, which warns
        # when a predicted class is absent from y_true)
        present = np.unique(y)
        return float(recall_score(y, pred, labels=present, average="macro", zero_division=0))
    if name == "f1_macro":
        # over all classes, 0 where undefined (absent classes score 0)
        labels = np.arange(num_classes)
        return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    raise MilkitError(f"unknown metric; choose one of {list(SCALAR_METRICS)}", value=name)


def epoch_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``auc`` and ``accuracy`` for the per-epoch validation log, in well under a millisecond.

    The same values as ``classification_metrics`` (the AUC through ``auc_rows``, tested equal to
    scikit-learn); it skips scikit-learn's per-call input checks, which cost ~20 ms per epoch and
    so dominated small-bag epochs. NaN AUC when a class is absent, without a warning.
    """
    y, p = _check_inputs(y_true, probs)
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    aucs = [float(auc_rows(y == k, p[:, k])[0]) for k in classes]
    return {"auc": float(np.mean(aucs)), "accuracy": float(np.mean(p.argmax(axis=1) == y))}


def auc_average(class_names: Sequence[str]) -> str:
    """How ``auc`` averages: ``binary (positive class 'X')`` or ``macro one-vs-rest``."""
    names = [str(c) for c in class_names]
    return f"binary (positive class {names[1]!r})" if len(names) == 2 else "macro one-vs-rest"


def auc_label(class_names: Sequence[str]) -> str:
    """Column title of the AUC: ``auc`` for binary tasks, ``auc (macro OvR)`` otherwise."""
    return "auc" if len(class_names) == 2 else "auc (macro OvR)"


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Slide-level metrics from true class indices and predicted class probabilities.

    Returns ``auc`` (positive-class AUC for two classes, macro one-vs-rest AUC for more, as
    ``auc_average`` says), ``accuracy``, ``balanced_accuracy``, ``f1_macro`` (over all classes,
    absent ones scoring 0), ``confusion_matrix`` (rows = true class, columns = predicted, as
    lists), ``auc_per_class`` (one-vs-rest, NaN for absent classes), ``class_names`` and ``n``.
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
        per_class[name] = binary_auc(positive, p[:, k]) if defined else math.nan
    out["auc_average"] = auc_average(names)
    out["auc_per_class"] = per_class
    out["confusion_matrix"] = confusion_matrix(
        y, p.argmax(axis=1), labels=np.arange(len(names))
    ).tolist()
    out["class_names"] = names
    out["n"] = int(y.size)
    return out


def format_number(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when it is missing, not a number or not
    finite (an AUC of a one-class fold, a metric a run did not record). The one formatter of
    metric tables: reports, ``milkit evaluate``, the CV summary, the demo."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


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
    resample gives a value, and (nan, nan) with a ``RuntimeWarning`` (``ci_refusal`` says why)
    when a class present has fewer than ``MIN_CI_PER_CLASS`` slides or every resample gives the
    same value: a percentile interval such as [1.000, 1.000] would look surer than it is.
    """
    y, p = _check_inputs(y_true, probs)
    if n_boot < 1:
        raise MilkitError("n_boot must be >= 1", value=n_boot)
    if not 0.0 < alpha < 1.0:
        raise MilkitError("alpha must be in (0, 1)", value=alpha)
    if not callable(metric) and metric not in SCALAR_METRICS:
        raise MilkitError(f"unknown metric; choose one of {list(SCALAR_METRICS)}", value=metric)
    rng = np.random.default_rng(seed)
    n = y.size
    if metric == "auc":  # all resamples at once (auc_rows); same draws as the loop below
        idx = rng.integers(0, n, size=(n_boot, n))
        classes = [1] if p.shape[1] == 2 else range(p.shape[1])
        per_class = [auc_rows(y[idx] == k, p[idx, k]) for k in classes]
        values = np.mean(np.stack(per_class), axis=0)  # NaN where a resample lacks a class
    else:
        fn = metric if callable(metric) else (lambda yy, pp: _scalar(metric, yy, pp, warn=False))
        values = np.array([fn(y[i], p[i]) for i in rng.integers(0, n, size=(n_boot, n))])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    note = ci_refusal(y, p.shape[1], values)
    if note is not None:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        return (math.nan, math.nan)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def ci_refusal(
    y_true: Sequence[int] | np.ndarray, num_classes: int, values: np.ndarray | None = None
) -> str | None:
    """Why a bootstrap CI of these slides would mislead, or None: a class present with fewer
    than ``MIN_CI_PER_CLASS`` slides, or (given the resampled ``values``) one value for all."""
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=num_classes)
    present = counts[counts > 0]
    if present.size and present.min() < MIN_CI_PER_CLASS:
        return (
            f"no bootstrap CI: {counts.tolist()} slides per class, fewer than "
            f"{MIN_CI_PER_CLASS} in a class give intervals that look surer than they are"
        )
    if values is not None and values.size and values.min() == values.max():
        return (
            f"no bootstrap CI: every resample of these {int(counts.sum())} slides gives the "
            f"same value ({float(values[0]):.3f})"
        )
    return None


def auc_ci(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Bootstrap CI of the AUC as ``{"auc_ci_low", "auc_ci_high"}``, or ``{"auc_ci_note"}``
    (with a warning) when the slides are too few or every resample gives one value."""
    y, p = _check_inputs(y_true, probs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        low, high = bootstrap_ci(y, p, "auc", n_boot=n_boot, alpha=alpha, seed=seed)
    if math.isfinite(low):
        return {"auc_ci_low": low, "auc_ci_high": high}
    notes = [str(w.message) for w in caught if str(w.message).startswith("no bootstrap CI")]
    note = notes[0] if notes else "no bootstrap CI: no resample has every class"
    warnings.warn(note, RuntimeWarning, stacklevel=2)
    return {"auc_ci_note": note}


def pooled_metrics(
    y_by_fold: Sequence[np.ndarray],
    probs_by_fold: Sequence[np.ndarray],
    class_names: Sequence[str],
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of all test folds' predictions pooled (out-of-fold), plus an AUC CI on request.

    Each slide is predicted once, by the model of the fold that held it out, so the pooled AUC
    uses every slide; the mean of per-fold AUCs hides how few slides each fold has.
    """
    y = np.concatenate([np.asarray(v, dtype=np.int64) for v in y_by_fold])
    p = np.concatenate([np.asarray(v, dtype=np.float64) for v in probs_by_fold])
    out = classification_metrics(y, p, class_names)
    if bootstrap > 0:
        out.update(auc_ci(y, p, n_boot=bootstrap, seed=seed))
    return out


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
    from sklearn.metrics import roc_curve

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
        auc = binary_auc(positive, p[:, k])
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
    "MIN_CI_PER_CLASS",
    "SCALAR_METRICS",
    "auc_average",
    "auc_ci",
    "auc_label",
    "auc_rows",
    "binary_auc",
    "bootstrap_ci",
    "ci_refusal",
    "classification_metrics",
    "epoch_metrics",
    "format_number",
    "plot_roc",
    "pooled_metrics",
    "summarise_folds",
]
