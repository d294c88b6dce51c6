"""Intra-op threads chosen from the work size (milkit.runtime.threads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milkit.data.datasets import BagDataset, InMemoryBagDataset
from milkit.errors import MilkitError
from milkit.io.bags import write_bag
from milkit.runtime.threads import (
    SMALL_STEP_VALUES,
    choose_threads,
    intra_op_threads,
    typical_bag_shape,
)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _bags(n: int, dim: int, count: int = 5) -> list[np.ndarray]:
    return [np.zeros((n + i % 2, dim), dtype=np.float32) for i in range(count)]


def test_small_bags_get_one_thread_large_ones_keep_the_default(two_threads, tmp_path):
    small = InMemoryBagDataset(_bags(7, 230), [0, 1, 0, 1, 0])
    assert typical_bag_shape(small) == (7, 230)
    assert choose_threads(None, small) == 1
    big_n = SMALL_STEP_VALUES // 64 + 1
    big = InMemoryBagDataset(_bags(big_n, 64), [0, 1, 0, 1, 0])
    assert choose_threads(None, big) == 2
    # batch size multiplies the work of a step
    assert choose_threads(None, small, batch_size=SMALL_STEP_VALUES // (7 * 230) + 1) == 2
    # bag files: the headers are read, not the features
    paths = []
    for i, x in enumerate(_bags(9, 16)):
        paths.append(write_bag(tmp_path / f"s{i}.h5", x, np.zeros((len(x), 2), dtype=np.int64)))
    assert typical_bag_shape(BagDataset(paths, [0] * 5)) == (9, 16)
    assert choose_threads(3, small) == 3  # an explicit request wins
    with pytest.raises(MilkitError, match="threads must be >= 1"):
        choose_threads(0, small)


def test_intra_op_threads_restores_the_setting(two_threads):
    with intra_op_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_trainer_and_predict_run_small_bags_on_one_thread(two_threads, tmp_path):
    """Fault 9: tiny bags trained with every core's threads (sync overhead); now one thread
    during the fit and the predictions, and the caller's setting afterwards."""
    from milkit.training.config import TrainConfig
    from milkit.training.trainer import Trainer, predict
    from tests.milkit.training._train_helpers import datasets, small_abmil

    train, val = datasets(n_train=6, n_val=2)
    seen: list[int] = []
    trainer = Trainer(small_abmil(), TrainConfig(epochs=2, progress=False), tmp_path)
    trainer._after_epoch = lambda epoch: seen.append(torch.get_num_threads())  # type: ignore
    with pytest.warns(UserWarning):  # 2-slide validation set
        trainer.fit(train, val)
    assert seen == [1, 1] and torch.get_num_threads() == 2
    predict(trainer.model, val)
    assert torch.get_num_threads() == 2
