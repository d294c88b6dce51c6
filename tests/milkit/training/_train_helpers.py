"""Small synthetic MIL data for the trainer tests (planted positive instances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def planted_bags(
    n_bags: int = 24,
    dim: int = 8,
    seed: int = 0,
    min_n: int = 3,
    max_n: int = 12,
    shift: float = 4.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags of N(0,1) instances; positive bags hold 1-2 instances shifted by ``shift`` on dim 0."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n_bags):
        n = int(rng.integers(min_n, max_n + 1))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        y = i % 2
        if y:
            k = int(rng.integers(1, 3))
            x[:k, 0] += shift
        bags.append(x)
        labels.append(y)
    return bags, np.asarray(labels)


def datasets(n_train: int = 24, n_val: int = 12, dim: int = 8, seed: int = 0, shift: float = 4.0):
    from milkit.data.datasets import InMemoryBagDataset

    bags, labels = planted_bags(n_train + n_val, dim, seed, shift=shift)
    ids = [f"s{i:03d}" for i in range(len(bags))]
    train = InMemoryBagDataset(bags[:n_train], labels[:n_train], slide_ids=ids[:n_train])
    val = InMemoryBagDataset(bags[n_train:], labels[n_train:], slide_ids=ids[n_train:])
    return train, val


def small_abmil(dim: int = 8, dropout: float = 0.25, seed: int = 0):
    from milkit import models

    torch.manual_seed(seed)
    return models.create(
        "abmil", dim, 2, fc_dim=16, attn_dim=8, fc_dropout=dropout, attn_dropout=dropout
    )


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> float:
    """Largest weight difference, ignoring parameters named in ``skip``."""
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if k not in skip)


# The attention-score bias has an exactly zero true gradient (softmax is shift-invariant); Adam
# normalises its float-noise gradient into lr-sized steps, so equivalence tests skip it (it has no
# effect on any output).
SOFTMAX_INVARIANT = ("pool.score.bias",)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread (intra-op sync dominates on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
