"""Out of memory on one big bag (issue 9, fault 7): the message names slide, N and phase, and the
remedy it names works for that phase.

A 300,000-tile bag is simulated: the aggregator's forward raises ``torch.OutOfMemoryError`` (or
the CPU allocator's RuntimeError) for bags above ``LIMIT`` instances.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from milkit.cli import main
from milkit.io.bags import write_bag
from milkit.models.abmil import ABMIL
from milkit.runtime.oom import BagOutOfMemoryError, is_out_of_memory, oom_context, remedy
from tests.milkit.training._train_helpers import one_thread, planted_bags  # noqa: F401 (autouse fixture)

LIMIT = 60  # instances a simulated device holds
BIG = 300  # the "300,000-tile" bag
TRAIN = ["--model", "abmil", "--model-arg", "fc_dim=8", "--model-arg", "attn_dim=4",
         "--epochs", "1", "--no-progress"]  # fmt: skip


@pytest.fixture()
def small_memory(monkeypatch):
    """ABMIL runs out of memory above LIMIT instances, as a GPU does on a huge bag."""
    forward = ABMIL.forward
    seen: list[int] = []

    def limited(self, x, mask=None, coords=None):
        seen.append(int(x.shape[1]))
        if x.shape[1] > LIMIT:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 42.00 GiB (GPU 0; 80 GiB total)"
            )
        return forward(self, x, mask, coords)

    monkeypatch.setattr(ABMIL, "forward", limited)
    return seen


def _cohort(root, big_split: str):
    """10 small slides + BIG, with a fixed split column placing BIG in ``big_split``."""
    bags_dir = root / "bags"
    bags, labels = planted_bags(11, 8, 0, shift=6.0, min_n=4, max_n=10)
    bags[10] = np.random.default_rng(5).normal(size=(BIG, 8)).astype(np.float32)
    splits = ["train"] * 6 + ["val", "val", "test", "test"] + [big_split]
    rows = []
    for i, (x, y) in enumerate(zip(bags, labels, strict=True)):
        coords = np.stack([np.arange(len(x)) * 256, np.zeros(len(x), dtype=int)], 1)
        sid = "BIG" if i == 10 else f"s{i}"
        write_bag(bags_dir / f"{sid}.h5", x, coords)
        rows.append({"slide_id": sid, "label": ["benign", "tumour"][y], "split": splits[i]})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, bags_dir


@pytest.mark.parametrize(
    ("big_split", "phase", "remedy_args"),
    [
        ("test", "test", ["--eval-max-instances", str(LIMIT)]),
        ("val", "validate", ["--eval-max-instances", str(LIMIT)]),
        ("train", "train", []),  # --max-instances (given below) is the train remedy
    ],
)
def test_train_names_slide_n_phase_and_the_remedy_works(
    tmp_path, capsys, small_memory, big_split, phase, remedy_args
):
    csv, bags = _cohort(tmp_path, big_split)
    base = ["train", "--bags", str(bags), "--labels", str(csv), *TRAIN]
    cap = [] if phase == "train" else ["--max-instances", "40"]  # the setting
    rc = main([*base, "--out", str(tmp_path / "run1"), *cap])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"out of memory in phase '{phase}' on slide BIG (N={BIG} instances" in err
    assert "model abmil" in err and "CUDA out of memory" in err and "fold_0)" in err
    if phase == "train":
        assert f"--max-instances {BIG // 4}" in err
    else:
        assert "--max-instances subsamples training bags only" in err
        assert "--eval-max-instances 40" in err  # suggests the user's own training cap
    # the remedy it names fixes it
    fix = remedy_args or ["--max-instances", str(LIMIT)]
    before = len(small_memory)
    rc = main([*base, "--out", str(tmp_path / "run2"), *cap, *fix])
    assert rc == 0, capsys.readouterr().err
    assert max(small_memory[before:]) <= LIMIT  # no forward saw more than the cap
    if big_split == "test":
        preds = pd.read_csv(tmp_path / "run2" / "fold_0" / "predictions.csv")
        assert "BIG" in set(preds["slide_id"])


def test_predict_names_phase_and_max_instances_works(tmp_path, capsys, monkeypatch):
    csv, bags = _cohort(tmp_path, "test")
    run = tmp_path / "run"
    assert main(["train", "--bags", str(bags), "--labels", str(csv), *TRAIN, "--out", str(run),
                 "--eval-max-instances", "100000"]) == 0  # fmt: skip
    capsys.readouterr()
    forward = ABMIL.forward

    def limited(self, x, mask=None, coords=None):
        if x.shape[1] > LIMIT:  # the CPU allocator's wording
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 98 GB")  # fmt: skip
        return forward(self, x, mask, coords)

    monkeypatch.setattr(ABMIL, "forward", limited)
    out = tmp_path / "p.csv"
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3 and not out.exists()
    assert f"out of memory in phase 'predict' on slide BIG (N={BIG} instances" in err
    assert f"milkit predict --max-instances {BIG // 4}" in err
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out),
               "--max-instances", str(LIMIT)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and len(pd.read_csv(out)) == 11
    assert f"BIG (N={BIG})" in err  # says which bags were subsampled

    from milkit.training.inference import attention_scores

    with pytest.raises(BagOutOfMemoryError, match=r"phase 'heatmap' on slide BIG \(N=300"):
        attention_scores(run, bags / "BIG.h5", device="cpu")


def test_eval_cap_is_deterministic_evenly_spaced_and_training_untouched(tmp_path):
    from milkit.data.datasets import BagDataset

    x = np.arange(100 * 2, dtype=np.float32).reshape(100, 2)
    coords = np.stack([np.arange(100) * 256, np.zeros(100, dtype=int)], 1)
    write_bag(tmp_path / "a.h5", x, coords)
    ds = BagDataset([tmp_path / "a.h5"], [0], eval_max_instances=5)
    item = ds[0]
    assert item["features"][:, 0].tolist() == [0.0, 50.0, 100.0, 148.0, 198.0]  # rows 0,25,50,74,99
    assert item["coords"][:, 0].tolist() == [0, 25 * 256, 50 * 256, 74 * 256, 99 * 256]
    assert torch.equal(ds[0]["features"], item["features"])
    ds.train(True)
    assert ds[0]["features"].shape == (100, 2)  # training bags: only max_instances applies


def test_oom_helpers():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"), oom_context("test", ["a"], 5):
        raise RuntimeError("shape mismatch")  # other errors pass through unchanged
    assert "--device cpu" in remedy("heatmap", 10, device="cuda:0")
    assert "--batch-size 1" in remedy("train", 10, batch_size=4)
