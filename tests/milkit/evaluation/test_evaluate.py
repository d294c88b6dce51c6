"""milkit.evaluation.evaluate: run-level metrics recomputed from the saved predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from milkit.errors import MilkitError
from milkit.evaluation.evaluate import COLUMNS, evaluate_run
from tests.milkit.io.test_runs import _run


def test_per_fold_mean_and_pooled_metrics_match_scikit_learn(tmp_path):
    rng = np.random.default_rng(0)
    folds = {}
    for k in range(3):
        y = rng.integers(0, 2, 12)
        y[:2] = [0, 1]  # both classes in every fold
        p = np.clip(0.3 * y + rng.uniform(0, 0.7, 12), 0, 1)  # overlapping: AUC < 1
        folds[k] = [(f"s{k}_{i}", ["benign", "tumour"][t], float(q))
                    for i, (t, q) in enumerate(zip(y, p))]  # fmt: skip
    res = evaluate_run(_run(tmp_path, folds), bootstrap=50, seed=1)
    aucs = []
    for k, rows in folds.items():
        y = [r[1] == "tumour" for r in rows]
        aucs.append(roc_auc_score(y, [r[2] for r in rows]))
        assert res["folds"][k]["auc"] == pytest.approx(aucs[-1]) and aucs[-1] < 1.0
        assert res["folds"][k]["auc_ci"] is None or len(res["folds"][k]["auc_ci"]) == 2
    assert res["summary"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert set(res["summary"]) == set(COLUMNS)
    everything = [r for rows in folds.values() for r in rows]
    pooled = roc_auc_score([r[1] == "tumour" for r in everything], [r[2] for r in everything])
    assert res["pooled_auc"] == pytest.approx(pooled)


def test_a_run_without_predictions_is_refused(tmp_path):
    run = _run(tmp_path, {})
    with pytest.raises(MilkitError, match=r"no test predictions.*--resume"):
        evaluate_run(run)
