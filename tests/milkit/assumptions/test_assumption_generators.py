"""The synthetic MIL tasks: exact instance counts, train/test shift, seeding, T3 concept choice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.assumptions.generators import (
    BACKGROUND,
    CONCEPT_A,
    CONCEPT_B,
    POISON,
    make_task,
)
from milkit.errors import MilkitError


def _counts(tags: np.ndarray) -> dict[int, int]:
    return {t: int((tags == t).sum()) for t in (BACKGROUND, CONCEPT_A, CONCEPT_B, POISON)}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bag_size=st.integers(1, 12), dim=st.integers(1, 20))
def test_t1_counts_and_poison_shift(seed: int, bag_size: int, dim: int) -> None:
    task = make_task("t1", seed, num_train=30, num_test=30, dim=dim, bag_size=bag_size)
    for draw in (task.train, task.test):
        assert draw.labels.sum() == 15  # exactly balanced
        for bag, tags, y in zip(draw.bags, draw.tags, draw.labels):
            assert bag.shape == (len(tags), dim) and bag.dtype == np.float32
            c = _counts(tags)
            assert c[BACKGROUND] == bag_size and c[CONCEPT_B] == 0
            poisoned = (y == 0) if draw.split == "train" else (y == 1)
            assert c[POISON] == int(poisoned)
            assert (1 <= c[CONCEPT_A] <= 3) if y == 1 else c[CONCEPT_A] == 0
            if c[POISON]:  # the poison really is N(-10, 0.1)
                assert np.allclose(bag[tags == POISON].mean(), -10.0, atol=0.5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_t2_counts_and_poison_shift(seed: int) -> None:
    task = make_task("t2", seed, num_train=40, num_test=40)
    for draw in (task.train, task.test):
        for tags, y in zip(draw.tags, draw.labels):
            c = _counts(tags)
            assert 1 <= c[BACKGROUND] <= 9
            poisoned = (y == 0) if draw.split == "train" else (y == 1)
            assert c[POISON] == int(poisoned)
            if y == 1:  # k of A and k of B, k in 1..3
                assert c[CONCEPT_A] == c[CONCEPT_B] and 1 <= c[CONCEPT_A] <= 3
            else:  # exactly one concept instance, A or B
                assert c[CONCEPT_A] + c[CONCEPT_B] == 1


def test_t2_concepts_have_their_means() -> None:
    draw = make_task("t2", 3, num_train=50, num_test=10).train
    feats = np.concatenate(draw.bags)
    tags = np.concatenate(draw.tags)
    assert abs(feats[tags == CONCEPT_A].mean() - 2.0) < 0.05
    assert abs(feats[tags == CONCEPT_B].mean() - 3.0) < 0.05
    assert feats[tags == CONCEPT_A].std() < 0.15


def test_t3_counts_shift_and_both_concepts_in_negatives() -> None:
    task = make_task("t3", 7, num_train=200, num_test=200)
    for draw in (task.train, task.test):
        neg_concepts = set()
        for tags, y in zip(draw.tags, draw.labels):
            c = _counts(tags)
            assert c[POISON] == 0 and 1 <= c[BACKGROUND] <= 9
            if y == 1:
                assert c[CONCEPT_A] == 1 and c[CONCEPT_B] == 1
            else:  # t copies of ONE concept
                assert min(c[CONCEPT_A], c[CONCEPT_B]) == 0
                t = max(c[CONCEPT_A], c[CONCEPT_B])
                assert t == 1 if draw.split == "train" else 35 <= t <= 44
                neg_concepts.add(CONCEPT_A if c[CONCEPT_A] else CONCEPT_B)
        # torchmil's bug (c always A) is fixed: both concepts appear among the negatives
        assert neg_concepts == {CONCEPT_A, CONCEPT_B}


def test_t3_positive_counts_are_a_parameter() -> None:
    draw = make_task("t3", 0, num_train=20, num_test=20, pos_counts=(2, 3)).train
    for tags, y in zip(draw.tags, draw.labels):
        if y == 1:
            assert _counts(tags)[CONCEPT_A] == 2 and _counts(tags)[CONCEPT_B] == 3


@pytest.mark.parametrize("name", ["t1", "t2", "t3"])
def test_same_seed_same_arrays_other_seed_differs(name: str) -> None:
    a = make_task(name, 11, num_train=20, num_test=20)
    b = make_task(name, 11, num_train=20, num_test=20)
    c = make_task(name, 12, num_train=20, num_test=20)
    for x, y in zip(a.train.bags + a.test.bags, b.train.bags + b.test.bags):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert any(
        x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a.train.bags, c.train.bags)
    )
    # the test draw is fresh, not a copy of the training draw
    assert not any(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a.train.bags, a.test.bags)
    )


def test_instances_are_shuffled_within_bags() -> None:
    draw = make_task("t1", 0, num_train=100, num_test=10).train
    positions = [int(np.flatnonzero(t == POISON)[0]) for t in draw.tags if (t == POISON).any()]
    assert len(set(positions)) > 3  # the poison is not always appended last


def test_bad_parameters_raise_milkit_errors() -> None:
    with pytest.raises(MilkitError, match="unknown assumption test"):
        make_task("t9")
    with pytest.raises(MilkitError, match="bad parameter"):
        make_task("t1", bogus=3)
    with pytest.raises(MilkitError, match="pos_class_prob"):
        make_task("t1", num_train=10, pos_class_prob=0.0)
    with pytest.raises(MilkitError, match="at least one A and one B"):
        make_task("t3", pos_counts=(0, 1))
