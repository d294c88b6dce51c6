"""Every registered aggregator trains under DDP (2 gloo ranks), and the ranks stay in lockstep.

One process pair trains every model of ``milkit.models.list_models()`` in sequence (tiny dims
from the contract test's ``SMALL``, a few tiny bags, two optimiser steps), so the whole registry
costs one process start-up. A model whose auxiliary loss (SC-MIL's projection head, AEM's
entropy term, MHIM's teacher) touches parameters outside the DDP-wrapped call used to crash with
"Expected to mark a variable ready only once".
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from milkit import models
from tests.models.test_contract import IN_DIM, SMALL

NAMES = models.list_models()
# The contract test's small sizes, plus models it does not shrink (yet); any unlisted model trains
# at its defaults.
TINY = {"transmil-sattention": {"dim": 32, "heads": 2}, **SMALL}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bags(n_bags: int, seed: int):
    from milkit.data.datasets import InMemoryBagDataset

    g = torch.Generator().manual_seed(seed)
    bags, coords, labels = [], [], []
    for i in range(n_bags):
        n = 5 + i % 4
        x = torch.randn(n, IN_DIM, generator=g)
        y = i % 2
        x[0, 0] += 3.0 * y
        idx = torch.arange(n)
        bags.append(x)
        coords.append(torch.stack([idx % 3, idx // 3], dim=-1) * 256)
        labels.append(y)
    return InMemoryBagDataset(bags, labels, coords=coords)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    # A short collective timeout: a model that fails on one rank only must not hang the test.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from milkit.runtime.distributed import cleanup_distributed
    from milkit.training.config import TrainConfig
    from milkit.training.trainer import Trainer

    results: dict[str, dict] = {}
    for name in NAMES:
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = models.create(name, IN_DIM, 2, **TINY.get(name, {}))
            batch = 4 if model.supports_padding else 1  # 4 bags of 2 classes: a positive pair
            cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=batch, progress=False, seed=0)
            # 2 optimiser steps per rank
            train = _bags(4 * batch, seed=1)
            Trainer(model, cfg, None).fit(train)
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[name] = {"ok": True, "checksum": float(params.double().sum()), "s": time.perf_counter() - t0,
                             "finite": bool(torch.isfinite(params).all())}  # fmt: skip
        except Exception as err:  # recorded, so every model is tried
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    cleanup_distributed()


@pytest.mark.slow
def test_every_registered_model_trains_under_ddp(tmp_path):
    # spawn, not fork: a pytest worker that already ran autograd cannot fork autograd users
    # ("Unable to handle autograd's threading in combination with fork-based multiprocessing")
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    failed = {n: r0[n].get("error") or r1[n].get("error") for n in NAMES
              if not (r0[n]["ok"] and r1[n]["ok"])}  # fmt: skip
    assert not failed, failed
    for name in NAMES:
        assert r0[name]["finite"], name
        # DDP averages gradients, so both ranks hold the same weights after every step
        assert r0[name]["checksum"] == pytest.approx(r1[name]["checksum"], rel=1e-5, abs=1e-5), name


def _cv_worker(rank: int, world: int, port: int, root: str) -> None:
    import time

    import torch.distributed as dist

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from milkit.data.labels import load_labels
    from milkit.runtime.distributed import cleanup_distributed
    from milkit.training import cv
    from milkit.training.config import TrainConfig

    if rank == 1:  # a slow rank: it checks the run folder after rank 0 reached its write
        check = cv._check_existing_run

        def slow_check(*args, **kwargs):
            time.sleep(1.0)
            return check(*args, **kwargs)

        cv._check_existing_run = slow_check
    csv_path, bags = Path(root, "labels.csv"), Path(root, "bags")
    table = load_labels(csv_path, bags)
    cfg = TrainConfig(epochs=1, progress=False, seed=0)
    try:
        cv.cross_validate(table, "abmil", cfg, Path(root, "run"), folds=2,
                          model_kwargs={"fc_dim": 8, "attn_dim": 4})  # fmt: skip
        Path(root, f"ok{rank}").write_text("ok")
    except Exception as err:
        Path(root, f"err{rank}").write_text(f"{type(err).__name__}: {err}")
    cleanup_distributed()


@pytest.mark.slow
def test_cross_validate_under_ddp_has_no_run_folder_race(tmp_path):
    """Rank 1 used to find the run.json rank 0 had just written: "run folder already holds a
    run" (one torchrun in three failed on a 2-core machine)."""
    from tests.milkit.training.test_cv import make_cohort

    make_cohort(tmp_path, n=12, shift=8.0)
    mp.start_processes(
        _cv_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    errors = [p.read_text() for p in tmp_path.glob("err*")]
    assert not errors, errors
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
    assert (tmp_path / "run" / "fold_1" / "metrics.json").exists()
