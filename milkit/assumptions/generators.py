"""Synthetic MIL tasks of Raff & Holt's algorithmic unit tests (NeurIPS 2023, arXiv 2310.17867).

Each test has a *training* distribution with a perfectly predictive shortcut that violates the
MIL assumption and a *test* distribution that moves the shortcut so that a shortcut-user ranks
bags below chance. Specification: ``shared/specs/assumption_tests.md`` §2 (parameters follow
torchmil's re-implementation, ``torchmil/datasets/{sc_standard,mc_standard,false_frequency}_dataset.py``).

Deliberate fixes of torchmil's defects (spec §2, "Known defects"):
1. every draw comes from ONE explicit ``np.random.Generator`` derived from ``seed`` (torchmil
   seeds numpy but samples from torch, so its seed has no effect); train and test use two
   independent child streams of ``np.random.SeedSequence(seed)``, so the test draw is fresh;
2. T3 negatives use a concept c drawn uniformly from {A, B} (torchmil's ``randint(0, 1)`` is
   always A);
3. T3 positive concept counts are parameters (default 1 A + 1 B, torchmil's effective value).

Departure: the number of positive bags is exactly ``round(num_bags * pos_class_prob)`` (torchmil
draws each label as a coin flip) so that every draw is balanced and AUC is always defined;
instances are shuffled inside each bag (``shuffle=True``) so that order-aware models cannot use
position as a cue.

Notation: ``N(mu, sigma)`` is isotropic with mean ``mu * 1_D`` and standard deviation ``sigma``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from milkit.errors import MilkitError

# Per-instance concept tags (``MILDraw.tags``), for tests and analysis.
BACKGROUND = 0
CONCEPT_A = 1  # T1: the single positive concept; T2/T3: concept A
CONCEPT_B = 2
POISON = 3
TAG_NAMES = {BACKGROUND: "background", CONCEPT_A: "A", CONCEPT_B: "B", POISON: "poison"}

TEST_NAMES = ("t1", "t2", "t3")
TEST_TITLES = {
    "t1": "T1 single-concept standard MIL (poison)",
    "t2": "T2 threshold MIL, A and B (poison)",
    "t3": "T3 false-frequency reliance",
}

# Distributions of spec §2 (torchmil values) as (mean, std).
BACKGROUND_DIST = (0.0, 1.0)
POISON_DIST = (-10.0, 0.1)
T1_CONCEPT_MIXTURE = ((0.0, 3.0), (1.0, 1.0))  # equal-probability mixture
CONCEPT_A_DIST = (2.0, 0.1)
CONCEPT_B_DIST = (3.0, 0.1)


@dataclass
class MILDraw:
    """One draw (train or test) of a synthetic MIL task.

    Attributes:
        bags: list of float32 arrays (n_i, D).
        labels: int64 array (num_bags,), 1 = positive.
        tags: list of int8 arrays (n_i,), the concept of each instance (``BACKGROUND``,
            ``CONCEPT_A``, ``CONCEPT_B``, ``POISON``).
        test: the test name (``t1``/``t2``/``t3``); ``split``: ``train`` or ``test``.
    """

    bags: list[np.ndarray]
    labels: np.ndarray
    tags: list[np.ndarray]
    test: str
    split: str
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.bags)

    def slide_ids(self) -> list[str]:
        return [f"{self.test}-{self.split}-{i:05d}" for i in range(len(self.bags))]


@dataclass
class MILTask:
    """A test's training draw and its shifted, independently drawn test set."""

    name: str
    train: MILDraw
    test: MILDraw
    seed: int
    params: dict[str, Any]


def _gauss(rng: np.random.Generator, n: int, dim: int, dist: tuple[float, float]) -> np.ndarray:
    mean, std = dist
    return rng.normal(mean, std, size=(n, dim))


def _assemble(
    rng: np.random.Generator, parts: list[tuple[np.ndarray, int]], shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``(instances, tag)`` parts into one bag and its tag vector (optionally shuffled)."""
    feats = np.concatenate([p for p, _ in parts], axis=0).astype(np.float32)
    tags = np.concatenate([np.full(len(p), t, dtype=np.int8) for p, t in parts])
    if shuffle:
        order = rng.permutation(len(tags))
        feats, tags = feats[order], tags[order]
    return feats, tags


def _balanced_labels(rng: np.random.Generator, num_bags: int, pos_class_prob: float) -> np.ndarray:
    n_pos = round(num_bags * pos_class_prob)
    labels = np.zeros(num_bags, dtype=np.int64)
    labels[:n_pos] = 1
    return rng.permutation(labels)


def _check_common(dim: int, num_bags: int, pos_class_prob: float) -> None:
    if dim < 1:
        raise MilkitError("feature dimension must be >= 1", value=dim)
    if num_bags < 2:
        raise MilkitError("a draw needs at least 2 bags (one per class)", value=num_bags)
    n_pos = round(num_bags * pos_class_prob)
    if not 0 < n_pos < num_bags:
        raise MilkitError(
            "pos_class_prob must leave at least one bag of each class",
            value=pos_class_prob,
            hint="use a value strictly between 0 and 1",
        )


def _add_poison(rng: np.random.Generator, parts: list, label: int, split: str, dim: int) -> None:
    """The poison shortcut of T1/T2: one N(-10, 0.1) instance in negative bags of the training
    draw and in positive bags of the test draw."""
    poisoned = (label == 0) if split == "train" else (label == 1)
    if poisoned:
        parts.append((_gauss(rng, 1, dim, POISON_DIST), POISON))


def single_concept(
    rng: np.random.Generator,
    *,
    split: str,
    dim: int = 16,
    num_bags: int = 400,
    bag_size: int = 10,
    pos_class_prob: float = 0.5,
    shuffle: bool = True,
) -> MILDraw:
    """T1, ``SC(D, num_bags, B)``: standard MIL with one concept and a poison shortcut.

    Positive bag: k ~ U{1,2,3} concept instances (each from N(0,3) or N(1,1) with probability
    1/2) + ``bag_size`` background N(0,1). Negative bag: ``bag_size`` background. Poison
    N(-10, 0.1): one per negative bag in ``train``, one per positive bag in ``test``.
    """
    _check_common(dim, num_bags, pos_class_prob)
    labels = _balanced_labels(rng, num_bags, pos_class_prob)
    bags, tags = [], []
    for y in labels:
        parts = [(_gauss(rng, bag_size, dim, BACKGROUND_DIST), BACKGROUND)]
        if y == 1:
            k = int(rng.integers(1, 4))  # U{1,2,3}
            which = rng.integers(0, 2, size=k)
            for w in which:
                parts.append((_gauss(rng, 1, dim, T1_CONCEPT_MIXTURE[int(w)]), CONCEPT_A))
        _add_poison(rng, parts, y, split, dim)
        feats, tag = _assemble(rng, parts, shuffle)
        bags.append(feats)
        tags.append(tag)
    params = {"dim": dim, "num_bags": num_bags, "bag_size": bag_size}
    params["pos_class_prob"] = pos_class_prob
    return MILDraw(bags, labels, tags, "t1", split, params)


def threshold_poison(
    rng: np.random.Generator,
    *,
    split: str,
    dim: int = 16,
    num_bags: int = 400,
    max_background: int = 9,
    pos_class_prob: float = 0.5,
    shuffle: bool = True,
) -> MILDraw:
    """T2, ``MC(D, num_bags)``: positive iff concepts A AND B are present; poison shortcut.

    Positive bag: k ~ U{1,2,3}, then k instances of A = N(2, 0.1) and k of B = N(3, 0.1), plus
    m ~ U{1..max_background} background. Negative bag: one A or one B (coin flip) plus
    m background. Poison as in T1 (negatives in ``train``, positives in ``test``).
    """
    _check_common(dim, num_bags, pos_class_prob)
    labels = _balanced_labels(rng, num_bags, pos_class_prob)
    bags, tags = [], []
    for y in labels:
        m = int(rng.integers(1, max_background + 1))
        parts = [(_gauss(rng, m, dim, BACKGROUND_DIST), BACKGROUND)]
        if y == 1:
            k = int(rng.integers(1, 4))
            parts.append((_gauss(rng, k, dim, CONCEPT_A_DIST), CONCEPT_A))
            parts.append((_gauss(rng, k, dim, CONCEPT_B_DIST), CONCEPT_B))
        elif rng.integers(0, 2) == 0:
            parts.append((_gauss(rng, 1, dim, CONCEPT_A_DIST), CONCEPT_A))
        else:
            parts.append((_gauss(rng, 1, dim, CONCEPT_B_DIST), CONCEPT_B))
        _add_poison(rng, parts, y, split, dim)
        feats, tag = _assemble(rng, parts, shuffle)
        bags.append(feats)
        tags.append(tag)
    params = {"dim": dim, "num_bags": num_bags, "max_background": max_background}
    params["pos_class_prob"] = pos_class_prob
    return MILDraw(bags, labels, tags, "t2", split, params)


def false_frequency(
    rng: np.random.Generator,
    *,
    split: str,
    dim: int = 16,
    num_bags: int = 400,
    max_background: int = 9,
    pos_counts: tuple[int, int] = (1, 1),
    neg_count_train: int = 1,
    neg_count_test: tuple[int, int] = (35, 44),
    pos_class_prob: float = 0.5,
    shuffle: bool = True,
) -> MILDraw:
    """T3, ``FF(D, num_bags)``: frequency of one concept must not stand in for "A and B".

    Positive bag: ``pos_counts`` = (#A, #B) instances (default 1 + 1) plus
    m ~ U{1..max_background} background. Negative bag: t copies of ONE concept c drawn
    uniformly from {A, B}, plus m background; t = ``neg_count_train`` in ``train`` and
    t ~ U{neg_count_test[0]..neg_count_test[1]} in ``test``. No poison.
    """
    _check_common(dim, num_bags, pos_class_prob)
    if min(pos_counts) < 1:
        raise MilkitError("T3 positives need at least one A and one B", value=pos_counts)
    lo, hi = neg_count_test
    if neg_count_train < 1 or lo < 1 or hi < lo:
        raise MilkitError(
            "T3 negative concept counts must be >= 1 with low <= high",
            value=(neg_count_train, neg_count_test),
        )
    labels = _balanced_labels(rng, num_bags, pos_class_prob)
    bags, tags = [], []
    for y in labels:
        m = int(rng.integers(1, max_background + 1))
        parts = [(_gauss(rng, m, dim, BACKGROUND_DIST), BACKGROUND)]
        if y == 1:
            parts.append((_gauss(rng, pos_counts[0], dim, CONCEPT_A_DIST), CONCEPT_A))
            parts.append((_gauss(rng, pos_counts[1], dim, CONCEPT_B_DIST), CONCEPT_B))
        else:
            t = neg_count_train if split == "train" else int(rng.integers(lo, hi + 1))
            if rng.integers(0, 2) == 0:
                parts.append((_gauss(rng, t, dim, CONCEPT_A_DIST), CONCEPT_A))
            else:
                parts.append((_gauss(rng, t, dim, CONCEPT_B_DIST), CONCEPT_B))
        feats, tag = _assemble(rng, parts, shuffle)
        bags.append(feats)
        tags.append(tag)
    params = {
        "dim": dim,
        "num_bags": num_bags,
        "max_background": max_background,
        "pos_counts": list(pos_counts),
        "neg_count_train": neg_count_train,
        "neg_count_test": list(neg_count_test),
        "pos_class_prob": pos_class_prob,
    }
    return MILDraw(bags, labels, tags, "t3", split, params)


GENERATORS: dict[str, Callable[..., MILDraw]] = {
    "t1": single_concept,
    "t2": threshold_poison,
    "t3": false_frequency,
}


def make_task(
    name: str,
    seed: int = 0,
    *,
    num_train: int = 400,
    num_test: int = 400,
    **params: Any,
) -> MILTask:
    """Draw the training set and an independent, shifted test set of test ``name``.

    Args:
        name: ``t1``, ``t2`` or ``t3``.
        seed: seeds ONE ``np.random.SeedSequence``; its two children drive train and test.
        num_train, num_test: bags per draw (spec default 400 / 400).
        **params: the generator's keyword parameters (``dim`` (16), ``bag_size`` (T1, 10),
            ``max_background``, ``pos_counts``, ``neg_count_test``, ``pos_class_prob``, ...).
    """
    key = name.strip().lower()
    if key not in GENERATORS:
        raise MilkitError(
            "unknown assumption test", value=name, hint=f"choose from {', '.join(TEST_NAMES)}"
        )
    gen = GENERATORS[key]
    train_ss, test_ss = np.random.SeedSequence(int(seed)).spawn(2)
    try:
        train = gen(np.random.default_rng(train_ss), split="train", num_bags=num_train, **params)
        test = gen(np.random.default_rng(test_ss), split="test", num_bags=num_test, **params)
    except TypeError as err:
        raise MilkitError(
            f"bad parameter for assumption test {key}: {err}", value=sorted(params)
        ) from err
    return MILTask(key, train, test, int(seed), dict(train.params))
