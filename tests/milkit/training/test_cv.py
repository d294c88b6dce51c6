"""Cross-validation: run folder layout, leak-free splits, summary, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from milkit.data.labels import load_labels
from milkit.data.splits import load_splits
from milkit.errors import MilkitError
from milkit.io.bags import write_bag
from milkit.training.config import TrainConfig
from milkit.training.cv import cross_validate, format_summary
from milkit.training.inference import load_checkpoint
from tests.milkit.training._train_helpers import one_thread, planted_bags  # noqa: F401 (fixture)


def make_cohort(
    root, n: int = 24, dim: int = 8, seed: int = 0, cases: bool = True, shift: float = 5.0
):
    """Bag files + labels CSV (two slides per case when ``cases``)."""
    bags_dir = root / "bags"
    bags, labels = planted_bags(n, dim, seed, shift=shift)
    rows = []
    for i, (x, y) in enumerate(zip(bags, labels)):
        coords = np.stack([np.arange(len(x)) * 256, np.zeros(len(x), dtype=int)], 1)
        write_bag(bags_dir / f"s{i:03d}.h5", x, coords)
        case = f"c{(i // 4) * 2 + (i % 2):03d}" if cases else f"s{i:03d}"
        rows.append({"slide_id": f"s{i:03d}", "label": ["benign", "tumour"][y], "case_id": case})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, bags_dir


def _cfg(**kw):
    return TrainConfig(**{"epochs": 4, "lr": 2e-2, "progress": False, "seed": 1, **kw})


KW = {"fc_dim": 16, "attn_dim": 8}


@pytest.mark.slow
def test_cross_validation_writes_the_run_folder_and_resumes(tmp_path):
    csv, bags_dir = make_cohort(tmp_path, n=30, shift=10.0)
    table = load_labels(csv, bags_dir)
    run = tmp_path / "run"
    res = cross_validate(table, "abmil", _cfg(), run, folds=3, model_kwargs=KW, bootstrap=50)
    assert [m["fold"] for m in res.folds] == [0, 1, 2]
    info = json.loads((run / "run.json").read_text())
    assert info["model_name"] == "abmil" and info["class_names"] == ["benign", "tumour"]
    assert info["in_dim"] == 8 and info["labels_csv"] == str(csv)
    # splits: every slide tested once, no case in two parts of a fold
    splits = load_splits(run / "splits.csv")
    case_of = dict(zip(table.frame["slide_id"], table.frame["case_id"]))
    tested = sorted(s for sp in splits for s in sp.test)
    assert tested == sorted(table.slide_ids)
    for sp in splits:
        train_cases = {case_of[s] for s in sp.train + sp.val}
        assert not train_cases & {case_of[s] for s in sp.test}
        assert sp.val, "inner validation split must exist"
    for k, sp in enumerate(splits):
        fold = run / f"fold_{k}"
        for name in ("best.pt", "last.pt", "log.csv", "predictions.csv", "metrics.json"):
            assert (fold / name).exists(), name
        preds = pd.read_csv(fold / "predictions.csv")
        assert sorted(preds["slide_id"]) == sorted(sp.test)
        assert list(preds.columns) == ["slide_id", "label", "pred", "prob_benign", "prob_tumour"]
        np.testing.assert_allclose(
            preds[["prob_benign", "prob_tumour"]].sum(axis=1), 1.0, rtol=1e-6
        )
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["n"] == len(sp.test)
        # an easy fold's resamples all give AUC 1.0: a note, not the interval [1.000, 1.000]
        assert metrics.get("auc_ci_note") or metrics["auc_ci_low"] < metrics["auc_ci_high"]
        _, meta = load_checkpoint(fold / "best.pt")
        assert meta["model_kwargs"] == KW and meta["epoch"] == metrics["best_epoch"]
    assert any((run / f"fold_{k}" / "roc.png").exists() for k in range(3))
    summary = json.loads((run / "summary.json").read_text())["summary"]
    assert summary["auc"]["mean"] > 0.8  # planted signal is easy
    assert summary["auc"]["mean"] == pytest.approx(np.mean([m["auc"] for m in res.folds]))
    table_csv = pd.read_csv(run / "summary.csv")
    assert list(table_csv["fold"].astype(str)) == ["0", "1", "2", "mean", "std", "pooled"]
    assert res.pooled["n"] == 30 and res.pooled["auc"] > 0.8  # every slide, out of fold
    assert "auc" in format_summary(res.summary)

    # resume: finished folds are not retrained; an unfinished fold is redone from last.pt
    stamp = (run / "fold_0" / "best.pt").stat().st_mtime_ns
    (run / "fold_2" / "metrics.json").unlink()
    again = cross_validate(table, "abmil", _cfg(), run, folds=3, model_kwargs=KW, resume=True)
    assert (run / "fold_0" / "best.pt").stat().st_mtime_ns == stamp
    assert again.folds[2]["auc"] == pytest.approx(res.folds[2]["auc"])
    assert again.summary["auc"]["mean"] == pytest.approx(res.summary["auc"]["mean"])
    with pytest.raises(MilkitError, match="run folder already holds a run"):
        cross_validate(table, "abmil", _cfg(), run, folds=3, model_kwargs=KW)
    with pytest.raises(MilkitError, match="cannot resume: model_kwargs differs"):
        cross_validate(table, "abmil", _cfg(), run, folds=3, resume=True)


def test_fixed_split_column_gives_one_fold_and_model_typo_fails_first(tmp_path):
    csv, bags_dir = make_cohort(tmp_path, n=12, cases=False)
    frame = pd.read_csv(csv)
    frame["split"] = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    frame.to_csv(csv, index=False)
    table = load_labels(csv, bags_dir)
    with pytest.raises(MilkitError, match="abmil"):
        cross_validate(table, "abmll", _cfg(), tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    res = cross_validate(table, "abmil", _cfg(epochs=1), tmp_path / "run", model_kwargs=KW)
    assert len(res.splits) == 1 and res.folds[0]["n"] == 4
    assert res.splits[0].test == [f"s{i:03d}" for i in range(8, 12)]
    sd = torch.load(tmp_path / "run" / "fold_0" / "best.pt", weights_only=True)
    assert sd["meta"]["class_names"] == ["benign", "tumour"]


def test_small_test_folds_get_a_note_instead_of_a_degenerate_ci(tmp_path):
    """Fault 8: a 5-slide fold gave the bootstrap CI [1.000, 1.000]."""
    from milkit.training.cv import write_fold_outputs
    from milkit.training.trainer import Predictions

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]])
    preds = Predictions([f"s{i}" for i in range(5)], np.array([0, 0, 1, 1, 1]), probs)
    with pytest.warns(RuntimeWarning, match="no bootstrap CI"):
        m = write_fold_outputs(tmp_path, preds, ["a", "b"], bootstrap=200)
    assert m["auc"] == 1.0 and "auc_ci_low" not in m and "auc_ci_high" not in m
    assert "fewer than 5 in a class" in m["auc_ci_note"]
    assert json.loads((tmp_path / "metrics.json").read_text())["auc_ci_note"] == m["auc_ci_note"]


def test_summary_has_pooled_out_of_fold_metrics_and_names_the_auc_average(tmp_path):
    from milkit.training.cv import write_summary

    folds = [{"fold": 0, "auc": 0.8, "accuracy": 0.7}, {"fold": 1, "auc": 0.6, "accuracy": 0.5}]
    pooled = {"auc": 0.71, "accuracy": 0.6, "class_names": ["a", "b", "c"]}
    write_summary(tmp_path, folds, {"model_name": "abmil"}, pooled)
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table.columns) == ["fold", "auc_macro_ovr", "accuracy"]
    assert list(table["fold"]) == ["0", "1", "mean", "std", "pooled"]
    assert table["auc_macro_ovr"].iloc[-1] == pytest.approx(0.71)
    text = format_summary({"auc": {"mean": 0.7, "std": 0.14, "n": 2}}, pooled)
    assert "auc (macro OvR)" in text and "0.700 ± 0.140 (2 folds)" in text and "0.710" in text


@pytest.mark.slow
def test_folds_in_parallel_processes_equal_folds_one_at_a_time(tmp_path):
    """Fault 9: small-bag folds train one per core (spawned processes); same numbers."""
    csv, bags_dir = make_cohort(tmp_path, n=16, cases=False, shift=6.0)
    table = load_labels(csv, bags_dir)
    cfg = _cfg(epochs=2, checkpoint_every_s=0.0)
    with pytest.warns(UserWarning, match="validation set has only"):
        one = cross_validate(table, "abmil", cfg, tmp_path / "one", folds=2, model_kwargs=KW,
                             fold_jobs=1)  # fmt: skip
    with pytest.warns(UserWarning, match="validation set has only"):  # re-shown by the parent
        two = cross_validate(table, "abmil", cfg, tmp_path / "two", folds=2, model_kwargs=KW,
                             fold_jobs=2)  # fmt: skip
    assert [m["fold"] for m in two.folds] == [0, 1]
    for k in (0, 1):
        a = pd.read_csv(tmp_path / "one" / f"fold_{k}" / "predictions.csv")
        b = pd.read_csv(tmp_path / "two" / f"fold_{k}" / "predictions.csv")
        pd.testing.assert_frame_equal(a, b)
    assert one.pooled["auc"] == two.pooled["auc"]
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert set(info["selection"]) == {"0", "1"}
