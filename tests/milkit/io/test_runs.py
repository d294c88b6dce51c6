"""milkit.io.runs: the one module that knows the run-folder layout (docs/architecture.md §5)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.io.runs import (
    BEST_CHECKPOINT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FILE,
    fold_checkpoints,
    fold_dir,
    fold_dirs,
    load_run,
    read_fold_predictions,
    read_predictions,
)

NAMES = ["benign", "tumour"]


def _run(tmp_path, folds: dict[int, list[tuple[str, str, float]]]) -> object:
    """A run folder with run.json and, per fold, best.pt + predictions.csv (slide, label, p1)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps({"class_names": NAMES, "in_dim": 4}))
    for k, rows in folds.items():
        d = fold_dir(run, k)
        d.mkdir()
        (d / BEST_CHECKPOINT).write_bytes(b"")
        frame = pd.DataFrame(
            {
                "slide_id": [r[0] for r in rows],
                "label": [r[1] for r in rows],
                "pred": [r[1] for r in rows],
                "prob_benign": [1 - r[2] for r in rows],
                "prob_tumour": [r[2] for r in rows],
            }
        )
        frame.to_csv(d / PREDICTIONS_FILE, index=False)
    return run


@settings(max_examples=20, deadline=None)
@given(st.sets(st.integers(0, 30), min_size=1, max_size=8))
def test_fold_dirs_are_ordered_by_number_not_by_name(tmp_path_factory, folds):
    run = tmp_path_factory.mktemp("r")
    for k in folds:
        fold_dir(run, k).mkdir()
    (run / "fold_x").mkdir()  # not a fold
    (run / "fold_3.txt").write_text("")  # not a folder
    assert [int(d.name[5:]) for d in fold_dirs(run)] == sorted(folds)


def test_predictions_keep_na_spellings_as_strings(tmp_path):
    # A slide named "NA" (or a class spelled "None") is data, not a missing value.
    run = _run(tmp_path, {0: [("NA", "tumour", 0.9), ("S2", "benign", 0.2)],
                          1: [("null", "benign", 0.4)]})  # fmt: skip
    frame = read_predictions(run, NAMES)
    assert frame["slide_id"].tolist() == ["NA", "S2", "null"]
    assert frame["fold"].tolist() == [0, 0, 1]
    parts = read_fold_predictions(run, NAMES)
    assert [k for k, _, _ in parts] == [0, 1]
    assert parts[0][1].tolist() == [1, 0]
    np.testing.assert_allclose(parts[0][2][:, 1], [0.9, 0.2])


def test_the_run_report_reader_keeps_a_slide_named_na(tmp_path):
    from milkit.evaluation.run_report import read_run_predictions

    run = _run(tmp_path, {0: [("NA", "tumour", 0.9)], 1: [("S2", "benign", 0.2)]})
    assert read_run_predictions(run).frame["slide_id"].tolist() == ["NA", "S2"]


def test_predictions_errors_name_the_file(tmp_path):
    run = _run(tmp_path, {0: [("S1", "tumour", 0.9)], 2: [("S2", "cancer", 0.2)]})
    with pytest.raises(MilkitError, match=r"labels outside the run's classes.*fold_2") as info:
        read_predictions(run, NAMES)
    assert "cancer" in str(info.value)
    pd.DataFrame({"slide_id": ["S3"], "label": ["tumour"]}).to_csv(
        fold_dir(run, 2) / PREDICTIONS_FILE, index=False
    )
    with pytest.raises(MilkitError, match=r"lacks columns \['prob_benign', 'prob_tumour'\]"):
        read_predictions(run, NAMES)


def test_fold_checkpoints_and_load_run_refuse_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(MilkitError, match="not a milkit run folder"):
        load_run(tmp_path)
    run = _run(tmp_path, {0: [("S1", "tumour", 0.9)], 1: [("S2", "benign", 0.2)]})
    assert fold_checkpoints(run) == [fold_dir(run, k) / BEST_CHECKPOINT for k in (0, 1)]
    assert fold_checkpoints(run, 1) == [fold_dir(run, 1) / BEST_CHECKPOINT]
    with pytest.raises(MilkitError, match="Available folds: 0, 1"):
        fold_checkpoints(run, 5)
    # test metrics without a selected checkpoint: an older milkit scored the last epoch
    (fold_dir(run, 1) / BEST_CHECKPOINT).unlink()
    (fold_dir(run, 1) / METRICS_FILE).write_text("{}")
    with pytest.raises(MilkitError, match=r"fold\(s\) \['fold_1'\] finished without"):
        fold_checkpoints(run)
