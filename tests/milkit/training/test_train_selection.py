"""Epoch selection: defaults, tie-breaks, undefined metrics, small validation sets (issue 9)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from milkit import models
from milkit.data.datasets import InMemoryBagDataset
from milkit.data.labels import load_labels
from milkit.errors import MilkitError
from milkit.io.bags import write_bag
from milkit.io.checkpoint import read_checkpoint
from milkit.io.runs import fold_checkpoints
from milkit.training.config import TrainConfig
from milkit.training.cv import cross_validate
from milkit.training.inference import load_checkpoint
from milkit.training.selection import MIN_VAL_SLIDES
from milkit.training.trainer import Trainer
from tests.milkit.training._train_helpers import datasets, one_thread, planted_bags, small_abmil  # noqa: F401
from tests.milkit.training.test_cv import make_cohort


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- fault 1
def test_cli_and_demo_select_on_val_loss_by_default():
    import argparse

    from milkit.commands.train import config_from_args, register
    from milkit.demo.pipeline import train_config

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--bags", "b", "--labels", "l", "--out", "o",
                              "--model", "abmil"])  # fmt: skip
    cli = config_from_args(args)
    demo = train_config("abmil", 20, 0, None, False)
    assert TrainConfig().monitor == cli.monitor == demo.monitor == "val_loss"
    assert cli.threads is None and demo.threads is None  # both chosen from the bag size


@pytest.mark.slow
def test_sixteen_slides_with_defaults_keep_a_trained_epoch(tmp_path):
    """Fault 1: 2-slide validation sets; val AUC ties kept the epoch-0 weights (AUC 0.25 /
    accuracy 0.5 on fold 1 before the fix; 1.0 / 1.0 now)."""
    csv, bags_dir = make_cohort(tmp_path, n=16, cases=False, shift=8.0, seed=1)
    table = load_labels(csv, bags_dir)
    res, caught = _quiet(
        cross_validate, table, "abmil", TrainConfig(epochs=30, progress=False), tmp_path / "run",
        folds=2,
    )  # fmt: skip
    for m in res.folds:
        assert m["monitor"] == "val_loss" and m["best_epoch"] > 0
        assert m["auc"] >= 0.9
    assert np.mean([m["accuracy"] for m in res.folds]) >= 0.85
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["selection"]["0"]["monitor"] == "val_loss"
    assert "lowest val_loss" in info["selection"]["1"]["reason"]
    small = [w for w in info["warnings"] if "validation set has only 2 slide(s)" in w]
    assert len(small) == 2 and small[0].startswith("fold 0: ")
    assert any("validation set has only 2 slide(s)" in w for w in caught)  # also in the log


def test_val_auc_ties_are_broken_by_val_loss():
    train, val = datasets(n_train=24, n_val=2, shift=6.0)  # 1 positive, 1 negative: AUC in {0,½,1}
    cfg = TrainConfig(epochs=12, lr=5e-3, progress=False, seed=3, monitor="val_auc")
    res, caught = _quiet(Trainer(small_abmil(), cfg).fit, train, val)
    aucs = [r["val_auc"] for r in res.history]
    best = max(aucs)
    tied = [r for r in res.history if r["val_auc"] == best]
    assert len(tied) >= 3, aucs  # the situation of fault 1
    expected = min(tied, key=lambda r: r["val_loss"])["epoch"]
    assert res.best_epoch == expected != tied[0]["epoch"]
    assert "tied, the lowest val_loss" in res.selection["reason"]
    if best == 1.0:
        assert any("saturated at 1.0" in w for w in res.warnings + caught)


# ----------------------------------------------------------------------------- fault 2
def _three_class_cohort(root, counts=(9, 9, 2)):
    bags, _ = planted_bags(sum(counts), 8, 0)
    labels = [c for c, n in zip("abc", counts) for _ in range(n)]
    rows = []
    for i, (x, label) in enumerate(zip(bags, labels)):
        x = x.copy()
        x[:, "abc".index(label) + 1] += 3.0
        coords = np.stack([np.arange(len(x)) * 256, np.zeros(len(x), dtype=int)], 1)
        write_bag(root / "bags" / f"s{i:02d}.h5", x, coords)
        rows.append({"slide_id": f"s{i:02d}", "label": label})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return load_labels(root / "labels.csv", root / "bags")


def test_missing_class_in_validation_falls_back_to_val_loss(tmp_path):
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(14)]
    train = InMemoryBagDataset(bags[:10], [0, 1, 2] * 3 + [0])
    val = InMemoryBagDataset(bags[10:], [0, 1, 0, 1])  # class 2 absent: AUC undefined
    torch.manual_seed(0)
    model = models.create("abmil", 8, 3, fc_dim=16, attn_dim=8)
    cfg = TrainConfig(epochs=3, lr=1e-3, progress=False, monitor="val_auc")
    res, caught = _quiet(Trainer(model, cfg, tmp_path).fit, train, val)
    assert all(math.isnan(r["val_auc"]) for r in res.history)
    assert res.monitor == "val_loss" and res.best_epoch >= 0
    assert (tmp_path / "best.pt").exists()
    _, meta = read_checkpoint(tmp_path / "best.pt")
    assert meta["monitor"] == "val_loss" and meta["epoch"] == res.best_epoch
    assert "val_auc was undefined" in meta["selection"]
    assert any("lacks class(es) ['2']" in w for w in caught)
    assert MIN_VAL_SLIDES > 4 and any("only 4 slide(s)" in w for w in res.warnings)


def test_no_finite_validation_score_still_writes_the_last_epoch(tmp_path, monkeypatch):
    train, val = datasets(n_train=8, n_val=4)
    monkeypatch.setattr(Trainer, "_validate", lambda self, model, ds, crit: {"val_loss": math.nan})
    res, caught = _quiet(
        Trainer(small_abmil(), TrainConfig(epochs=2, progress=False), tmp_path).fit, train, val
    )
    assert res.best_epoch == 1 and res.checkpoint == tmp_path / "best.pt"
    _, meta = read_checkpoint(tmp_path / "best.pt")
    assert meta["epoch"] == 1 and "last epoch is kept" in meta["selection"]
    assert any("no epoch had a finite val_loss" in w for w in caught)


def test_rare_class_cohort_gives_every_fold_a_checkpoint_and_old_runs_are_retrained(tmp_path):
    """Fault 2: 20 bags, classes 9/9/2; two folds' validation sets lack the rare class."""
    table = _three_class_cohort(tmp_path)
    run = tmp_path / "run"
    cfg = TrainConfig(epochs=3, progress=False, monitor="val_auc")
    res, caught = _quiet(cross_validate, table, "abmil", cfg, run, folds=5)
    for m in res.folds:
        ckpt = run / f"fold_{m['fold']}" / "best.pt"
        assert ckpt.exists(), f"fold {m['fold']} has no best.pt"
        _, meta = load_checkpoint(ckpt)
        assert meta["epoch"] == m["best_epoch"] >= 0 and m["selection"]
    fallback = [m for m in res.folds if m["monitor"] == "val_loss"]
    assert fallback, "the cohort must reproduce the undefined validation AUC"
    assert len(fold_checkpoints(run)) == 5
    info = json.loads((run / "run.json").read_text())
    assert any("lacks class(es) ['c']" in w for w in info["warnings"])

    # A run broken the old way (test metrics, no best.pt): predict refuses it, resume retrains it.
    broken = run / f"fold_{fallback[0]['fold']}"
    (broken / "best.pt").unlink()
    with pytest.raises(MilkitError, match=r"finished without a selected checkpoint"):
        fold_checkpoints(run)
    again, caught = _quiet(cross_validate, table, "abmil", cfg, run, folds=5, resume=True)
    assert (broken / "best.pt").exists() and len(fold_checkpoints(run)) == 5
    assert any("no best.pt" in w for w in caught)
    assert [m["best_epoch"] for m in again.folds] == [m["best_epoch"] for m in res.folds]


def test_threads_option_is_validated_and_restored():
    train, val = datasets(n_train=4, n_val=2)
    before = torch.get_num_threads()
    with pytest.raises(MilkitError, match="threads must be >= 1"):
        TrainConfig(threads=0)
    seen = []
    trainer = Trainer(small_abmil(), TrainConfig(epochs=1, progress=False, threads=2))
    trainer._after_epoch = lambda epoch: seen.append(torch.get_num_threads())  # type: ignore
    _quiet(trainer.fit, train, val)
    assert seen == [2] and torch.get_num_threads() == before
