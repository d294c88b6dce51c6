"""Grouped, stratified CV splits; fixed splits; split files (milkit.data.splits)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.data.labels import LabelTable
from milkit.data.splits import (
    FoldSplit,
    fixed_split,
    load_splits,
    make_cv_splits,
    save_splits,
    validate_splits,
)
from milkit.errors import MilkitError


def _table(cases: list[tuple[int, int]], split: list[str] | None = None) -> LabelTable:
    """cases: (number of slides, label) per case."""
    rows = []
    for c, (n, label) in enumerate(cases):
        for s in range(n):
            rows.append(
                {
                    "slide_id": f"c{c}_s{s}",
                    "label": str(label),
                    "label_idx": label,
                    "case_id": f"c{c}",
                    "bag_path": "",
                }
            )
    frame = pd.DataFrame(rows)
    if split is not None:
        frame["split"] = split
    return LabelTable(frame, sorted({str(lab) for _, lab in cases}), 8)


def _check_invariants(table: LabelTable, splits: list[FoldSplit], folds: int) -> None:
    frame = table.frame
    case_of = dict(zip(frame["slide_id"], frame["case_id"], strict=True))
    all_ids = set(frame["slide_id"])
    assert len(splits) == folds and [s.fold for s in splits] == list(range(folds))
    tested = Counter(x for s in splits for x in s.test)
    assert set(tested) == all_ids and set(tested.values()) == {1}  # each slide tested once
    tested_cases: dict[str, int] = {}
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert sum(len(p) for p in parts) == len(all_ids)
        assert set().union(*parts) == all_ids
        assert not (parts[1] & parts[2]) and not (parts[0] & parts[2])  # never val on the test fold
        cases = [{case_of[x] for x in p} for p in parts]
        assert not (cases[0] & cases[1]) and not (cases[0] & cases[2]) and not (cases[1] & cases[2])
        assert s.train  # something to train on
        for c in cases[2]:
            assert c not in tested_cases  # no patient in two test folds
            tested_cases[c] = s.fold
    validate_splits(splits, table)


@settings(max_examples=25, deadline=None)
@given(
    cases=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)), min_size=6, max_size=40),
    folds=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_grouped_splits_invariants(cases: list[tuple[int, int]], folds: int, seed: int) -> None:
    if len(set(lab for _, lab in cases)) < 2 or len(cases) < folds:
        return
    table = _table(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = make_cv_splits(table, folds=folds, val_fraction=0.2, seed=seed)
    _check_invariants(table, splits, folds)


@settings(max_examples=20, deadline=None)
@given(
    per_class=st.lists(st.integers(5, 15), min_size=2, max_size=3),
    sizes=st.lists(st.integers(1, 3), min_size=45, max_size=45),
    folds=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_stratification_holds(
    per_class: list[int], sizes: list[int], folds: int, seed: int
) -> None:
    """With >= folds cases per class, every test fold and every validation set sees every class,
    and each fold's test cases per class are close to the class's share."""
    cases = [(sizes[i % 45], label) for label, n in enumerate(per_class) for i in range(n)]
    table = _table(cases)
    splits = make_cv_splits(table, folds=folds, val_fraction=0.2, seed=seed)
    _check_invariants(table, splits, folds)
    label_of = dict(zip(table.frame["slide_id"], table.frame["label_idx"], strict=True))
    case_of = dict(zip(table.frame["slide_id"], table.frame["case_id"], strict=True))
    for s in splits:
        assert {label_of[x] for x in s.test} == set(range(len(per_class)))
        assert {label_of[x] for x in s.val} == set(range(len(per_class)))
        for label, n in enumerate(per_class):
            test_cases = {case_of[x] for x in s.test if label_of[x] == label}
            assert abs(len(test_cases) - n / folds) <= 2


def test_val_fraction_and_seed() -> None:
    table = _table([(1, i % 2) for i in range(100)])
    splits = make_cv_splits(table, folds=5, val_fraction=0.15, seed=3)
    for s in splits:
        assert len(s.test) == 20 and len(s.val) == 12  # round(0.15 * 40) per class
    again = make_cv_splits(table, folds=5, val_fraction=0.15, seed=3)
    assert again == splits
    other = make_cv_splits(table, folds=5, val_fraction=0.15, seed=4)
    assert other != splits
    assert all(s.val == [] for s in make_cv_splits(table, folds=5, val_fraction=0.0))


def test_bad_arguments() -> None:
    table = _table([(1, 0), (1, 1), (1, 0)])
    with pytest.raises(MilkitError, match="cannot make 4 folds from 3 cases"):
        make_cv_splits(table, folds=4)
    with pytest.raises(MilkitError, match="folds must be an integer >= 2"):
        make_cv_splits(table, folds=1)
    with pytest.raises(MilkitError, match="val_fraction"):
        make_cv_splits(table, folds=2, val_fraction=1.0)
    with pytest.warns(UserWarning, match="fewer cases than folds"):
        make_cv_splits(table, folds=2)
    rare = _table([(1, 0)] * 6 + [(1, 1)] * 2)  # 1 training case of class 1 per fold
    with pytest.warns(UserWarning, match=r"class\(es\) \[1\] have fewer than two training"):
        make_cv_splits(rare, folds=2, val_fraction=0.3)


def test_fixed_split() -> None:
    table = _table(
        [(2, 0), (1, 1), (1, 0), (1, 1)], split=["train", "train", "val", "test", "train"]
    )
    s = fixed_split(table)
    assert (s.fold, s.train, s.val, s.test) == (
        0,
        ["c0_s0", "c0_s1", "c3_s0"],
        ["c1_s0"],
        ["c2_s0"],
    )
    leaky = _table([(2, 0), (1, 1)], split=["train", "test", "train"])
    with pytest.raises(MilkitError, match="more than one split part"):
        fixed_split(leaky)
    with pytest.raises(MilkitError, match="no 'split' column"):
        fixed_split(_table([(1, 0), (1, 1)]))


def test_save_load_round_trip(tmp_path: Path) -> None:
    table = _table([(1 + i % 3, i % 2) for i in range(20)])
    splits = make_cv_splits(table, folds=4, seed=1)
    path = save_splits(splits, tmp_path / "run" / "splits.csv")
    assert not (tmp_path / "run" / "splits.csv.partial").exists()
    header = path.read_text().splitlines()[0]
    assert header == "slide_id,fold,split"
    loaded = load_splits(path)
    assert [(s.fold, sorted(s.train), sorted(s.val), sorted(s.test)) for s in loaded] == [
        (s.fold, sorted(s.train), sorted(s.val), sorted(s.test)) for s in splits
    ]
    validate_splits(loaded, table)


def test_load_splits_errors(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    with pytest.raises(MilkitError, match="split file not found"):
        load_splits(p)
    p.write_text("slide_id,fold\na,0\n")
    with pytest.raises(MilkitError, match=r"lacks column\(s\) \['split'\]"):
        load_splits(p)
    p.write_text("slide_id,fold,split\na,0,training_set\n")
    with pytest.raises(MilkitError, match="train/val/test"):
        load_splits(p)
    p.write_text("slide_id,fold,split\na,0,train\na,0,test\n")
    with pytest.raises(MilkitError, match="twice in one fold"):
        load_splits(p)


def test_validate_splits_catches_unknown_and_leaks() -> None:
    table = _table([(2, 0), (1, 1)])
    with pytest.raises(MilkitError, match="not in the labels table"):
        validate_splits([FoldSplit(0, ["c0_s0", "zz"], [], ["c1_s0"])], table)
    with pytest.raises(MilkitError, match="case"):
        validate_splits([FoldSplit(0, ["c0_s0"], [], ["c0_s1", "c1_s0"])], table)


def test_every_class_smaller_than_folds_still_splits() -> None:
    """StratifiedGroupKFold refused 6 cases (4 + 2) in 5 folds; cases are now dealt out."""
    table = _table([(1, 0)] * 4 + [(1, 1)] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = make_cv_splits(table, folds=5, val_fraction=0.2, seed=0)
    _check_invariants(table, splits, 5)


@settings(max_examples=25, deadline=None)
@given(
    cases=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)), min_size=6, max_size=40),
    folds=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_validation_holds_every_class_the_training_part_can_spare(
    cases: list[tuple[int, int]], folds: int, seed: int
) -> None:
    """A class with two or more training cases puts at least one in validation (and keeps one for
    training), so the validation AUC is defined whenever the data allow it."""
    if len(set(lab for _, lab in cases)) < 2 or len(cases) < folds:
        return
    table = _table(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = make_cv_splits(table, folds=folds, val_fraction=0.1, seed=seed)
    frame = table.frame
    label_of = dict(zip(frame["slide_id"], frame["label_idx"], strict=True))
    case_of = dict(zip(frame["slide_id"], frame["case_id"], strict=True))
    for s in splits:
        for label in set(label_of.values()):
            train_cases = {case_of[x] for x in s.train + s.val if label_of[x] == label}
            if len(train_cases) >= 2:
                assert any(label_of[x] == label for x in s.val)
                assert any(label_of[x] == label for x in s.train)
