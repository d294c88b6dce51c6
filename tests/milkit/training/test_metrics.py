"""Metrics equal scikit-learn; missing classes; fold summaries; bootstrap; ROC plot."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from milkit.errors import MilkitError
from milkit.training.metrics import (
    bootstrap_ci,
    classification_metrics,
    format_number,
    plot_roc,
    summarise_folds,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_binary_known_values() -> None:
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["neg", "pos"])
    assert m["auc"] == pytest.approx(0.75)  # the textbook sklearn example
    assert m["accuracy"] == pytest.approx(0.75)  # preds 0,0,0,1
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert m["f1_macro"] == pytest.approx(f1_score(y, [0, 0, 0, 1], average="macro"))
    assert m["n"] == 4 and m["class_names"] == ["neg", "pos"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(6, 60), num_classes=st.integers(2, 4))
def test_metrics_equal_sklearn(seed: int, n: int, num_classes: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    probs = _softmax(rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[y])
    m = classification_metrics(y, probs, [f"c{k}" for k in range(num_classes)])
    pred = probs.argmax(1)
    if num_classes == 2:
        ref_auc = roc_auc_score(y, probs[:, 1])
    else:
        ref_auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(ref_auc, abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=list(range(num_classes)), zero_division=0)
    )
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(num_classes)).tolist()


def test_three_class_macro_ovr_by_hand() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.3, 0.6],
            [0.3, 0.4, 0.3],
            [0.5, 0.3, 0.2],
            [0.2, 0.2, 0.6],
        ]
    )
    per_class = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["auc"] == pytest.approx(np.mean(per_class))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert list(m["auc_per_class"].values()) == pytest.approx(per_class)


def test_missing_class_gives_nan_auc_and_warning() -> None:
    y = np.array([0, 0, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[1\] do not occur"):
        m = classification_metrics(y, probs, ["a", "b", "c"])
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # mean recall of classes a and c
    assert math.isnan(m["auc_per_class"]["b"]) and m["auc_per_class"]["a"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 0, 0], [0, 1, 1]]
    with pytest.warns(RuntimeWarning):
        single = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["n", "p"])
    assert math.isnan(single["auc"]) and single["accuracy"] == 0.5


def test_input_errors() -> None:
    with pytest.raises(MilkitError, match=r"shape \(n, C\)"):
        classification_metrics([0, 1], np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(MilkitError, match="3 class names"):
        classification_metrics([0, 1], np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(MilkitError, match="class indices"):
        classification_metrics([0, 2], np.full((2, 2), 0.5), ["a", "b"])
    with pytest.raises(MilkitError, match="NaN"):
        classification_metrics([0, 1], np.array([[np.nan, 1], [0, 1]]), ["a", "b"])


def test_summarise_folds() -> None:
    folds = [
        {"auc": 0.8, "accuracy": 0.7, "n": 10, "confusion_matrix": [[1]]},
        {"auc": 0.9, "accuracy": 0.9, "n": 12, "confusion_matrix": [[1]]},
        {"auc": math.nan, "accuracy": 0.8, "n": 11, "confusion_matrix": [[1]]},
    ]
    s = summarise_folds(folds)
    assert set(s) == {"auc", "accuracy"}
    assert s["auc"]["mean"] == pytest.approx(0.85) and s["auc"]["n"] == 2
    assert s["auc"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["accuracy"]["mean"] == pytest.approx(0.8)
    assert s["accuracy"]["std"] == pytest.approx(0.1)
    assert summarise_folds([{"auc": 0.5}])["auc"]["std"] == 0.0
    mixed = summarise_folds(
        [{"fold": 0, "best_val": None, "monitor": "val_auc"}, {"fold": 1, "best_val": 0.7}]
    )
    assert mixed == {"best_val": {"mean": 0.7, "std": 0.0, "n": 1}}
    with pytest.raises(MilkitError):
        summarise_folds([])


def test_bootstrap_ci_contains_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    probs = _softmax(rng.normal(size=(120, 2)) + np.eye(2)[y])
    point = classification_metrics(y, probs, ["a", "b"])
    for metric in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        low, high = bootstrap_ci(y, probs, metric=metric, n_boot=300, seed=1)
        assert low < point[metric] < high
        assert 0.02 < high - low < 0.4
    narrow = bootstrap_ci(y, probs, n_boot=300, alpha=0.5, seed=1)
    wide = bootstrap_ci(y, probs, n_boot=300, alpha=0.01, seed=1)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert bootstrap_ci(y, probs, n_boot=50, seed=3) == bootstrap_ci(y, probs, n_boot=50, seed=3)
    one_class = bootstrap_ci([1, 1, 1], np.full((3, 2), 0.5), n_boot=20)
    assert all(math.isnan(v) for v in one_class)
    with pytest.raises(MilkitError, match="unknown metric"):
        bootstrap_ci(y, probs, metric="kappa")


def test_plot_roc_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    probs = _softmax(rng.normal(size=(40, 3)) + np.eye(3)[y])
    out = plot_roc(y, probs, ["a", "b", "c"], tmp_path / "fold_0" / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "fold_0" / "roc.png.partial").exists()
    out2 = plot_roc(y % 2, probs[:, :2], ["n", "p"], tmp_path / "roc2.png")
    assert out2.stat().st_size > 1000


def test_auc_with_tied_scores_equals_sklearn() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    p1 = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1), 1)  # many ties
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), ["a", "b"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), rows=st.integers(1, 6))
def test_auc_rows_equal_sklearn_row_by_row(seed: int, n: int, rows: int) -> None:
    """The vectorised bootstrap AUC is scikit-learn's AUC, ties included; NaN for one class."""
    from milkit.training.metrics import auc_rows, binary_auc

    rng = np.random.default_rng(seed)
    positive = rng.random((rows, n)) < 0.5
    score = np.round(rng.random((rows, n)), 1)  # many ties
    got = auc_rows(positive, score)
    for r in range(rows):
        if positive[r].all() or not positive[r].any():
            assert math.isnan(got[r]) and math.isnan(binary_auc(positive[r], score[r]))
        else:
            assert got[r] == pytest.approx(roc_auc_score(positive[r], score[r]), abs=1e-12)
            assert binary_auc(positive[r], score[r]) == roc_auc_score(positive[r], score[r])


def test_auc_names_its_average() -> None:
    from milkit.training.metrics import auc_label

    rng = np.random.default_rng(1)
    y = np.arange(12) % 3
    probs = _softmax(rng.normal(size=(12, 3)))
    assert classification_metrics(y, probs, ["a", "b", "c"])["auc_average"] == "macro one-vs-rest"
    binary = classification_metrics(y % 2, probs[:, :2], ["neg", "pos"])
    assert binary["auc_average"] == "binary (positive class 'pos')"
    assert auc_label(["a", "b", "c"]) == "auc (macro OvR)" and auc_label(["n", "p"]) == "auc"


def test_auc_ci_refuses_small_or_degenerate_sets_and_pooled_uses_every_slide() -> None:
    from milkit.training.metrics import MIN_CI_PER_CLASS, auc_ci, pooled_metrics

    small_y = np.array([0, 0, 1, 1, 1])
    small_p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]])
    with pytest.warns(RuntimeWarning, match="no bootstrap CI"):
        assert set(auc_ci(small_y, small_p, n_boot=100)) == {"auc_ci_note"}
    for metric in ("auc", "accuracy"):  # every caller of bootstrap_ci (reports too)
        with pytest.warns(RuntimeWarning, match=r"\[2, 3\] slides per class"):
            assert all(math.isnan(v) for v in bootstrap_ci(small_y, small_p, metric, n_boot=50))
    perfect_y = np.repeat([0, 1], MIN_CI_PER_CLASS)
    perfect_p = np.stack([1 - perfect_y * 0.9 - 0.05, perfect_y * 0.9 + 0.05], 1)
    with pytest.warns(RuntimeWarning, match="every resample"):
        assert "auc_ci_note" in auc_ci(perfect_y, perfect_p, n_boot=100)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = _softmax(rng.normal(size=(80, 2)) + np.eye(2)[y])
    ci = auc_ci(y, p, n_boot=200, seed=2)
    assert ci["auc_ci_low"] < classification_metrics(y, p, ["a", "b"])["auc"] < ci["auc_ci_high"]
    pooled = pooled_metrics([y[:40], y[40:]], [p[:40], p[40:]], ["a", "b"], bootstrap=200, seed=2)
    assert pooled["n"] == 80 and pooled["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert (pooled["auc_ci_low"], pooled["auc_ci_high"]) == (ci["auc_ci_low"], ci["auc_ci_high"])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), num_classes=st.integers(2, 4))
def test_epoch_metrics_equal_classification_metrics(seed: int, n: int, num_classes: int) -> None:
    from milkit.training.metrics import epoch_metrics

    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    probs = _softmax(np.round(rng.normal(size=(n, num_classes)), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = classification_metrics(y, probs, [str(k) for k in range(num_classes)])
    fast = epoch_metrics(y, probs)
    assert fast["accuracy"] == pytest.approx(full["accuracy"])
    if math.isnan(full["auc"]):
        assert math.isnan(fast["auc"])
    else:
        assert fast["auc"] == pytest.approx(full["auc"], abs=1e-12)


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [(0.91234, 3, "0.912"), (np.float32(0.5), 2, "0.50"), ("0.25", 3, "0.250"), (1, 1, "1.0"),
     (None, 3, "n/a"), (float("nan"), 3, "n/a"), (float("inf"), 3, "n/a"), ("", 3, "n/a")],
)  # fmt: skip
def test_format_number_gives_n_a_for_anything_not_a_finite_number(value, digits, text):
    assert format_number(value, digits) == text
