"""DDP: two gloo processes with batch 1 equal one process accumulating two bags per step."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from milkit.training.config import TrainConfig
from milkit.training.trainer import Trainer
from tests.milkit.training._train_helpers import (
    SOFTMAX_INVARIANT,
    datasets,
    max_abs_diff,
    small_abmil,
)

CFG = {"epochs": 2, "lr": 1e-2, "progress": False, "seed": 3, "warmup_epochs": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from milkit.runtime.distributed import cleanup_distributed

    train, val = datasets(n_train=10, n_val=6)
    model = small_abmil(dropout=0.0, seed=3)
    trainer = Trainer(model, TrainConfig(**CFG, patience=5), out_dir)
    assert trainer.dist.world_size == world and trainer.dist.rank == rank
    trainer.fit(train, val)
    if rank == 1:  # the non-main rank writes nothing; its weights must equal rank 0's
        torch.save(model.state_dict(), os.path.join(out_dir, "rank1_weights.pt"))
    cleanup_distributed()


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_with_accumulation(tmp_path):
    # spawn, not fork: a pytest worker that already ran autograd cannot fork autograd users
    # ("Unable to handle autograd's threading in combination with fork-based multiprocessing");
    # the children import torch and milkit again (a few seconds).
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    ddp = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    rank1 = torch.load(tmp_path / "rank1_weights.pt", weights_only=True)
    assert all(torch.equal(best[k], rank1[k]) for k in best)  # ranks agree on the selection
    assert len(list(tmp_path.glob("log.csv"))) == 1  # rank 0 wrote the log

    train, val = datasets(n_train=10, n_val=6)
    single = small_abmil(dropout=0.0, seed=3)
    Trainer(single, TrainConfig(**CFG, accumulate=2, patience=5), tmp_path / "single").fit(
        train, val
    )
    ref = small_abmil(dropout=0.0)
    ref.load_state_dict(torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"])
    got = small_abmil(dropout=0.0)
    got.load_state_dict(ddp)
    assert max_abs_diff(got, ref, skip=SOFTMAX_INVARIANT) < 1e-5
