"""Checkpoints: weights-only loadable, safetensors round trip, malicious pickles refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from milkit.errors import MilkitError
from milkit.io.checkpoint import (
    load_train_state,
    plain,
    read_checkpoint,
    save_checkpoint,
    save_train_state,
)
from milkit.training.inference import load_checkpoint
from tests.milkit.training._train_helpers import one_thread, small_abmil, state_equal  # noqa: F401

META = {
    "model_name": "abmil",
    "model_kwargs": {"fc_dim": 16, "attn_dim": 8, "fc_dropout": 0.25, "attn_dropout": 0.25},
    "class_names": ["benign", "tumour"],
    "in_dim": 8,
    "train_config": {"lr": 1e-3, "patience": None},
}


class _Evil:
    """Unpickling this creates a file: the stand-in for arbitrary code execution."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_rebuilds_the_model_from_metadata(tmp_path, suffix):
    model = small_abmil(seed=4)
    path = save_checkpoint(tmp_path / f"best{suffix}", model, META)
    rebuilt, meta = load_checkpoint(path)
    assert state_equal(rebuilt, model) and not rebuilt.training
    assert meta["class_names"] == ["benign", "tumour"] and meta["train_config"]["patience"] is None
    x = torch.randn(1, 5, 8)
    model.eval()
    assert torch.equal(model(x).logits, rebuilt(x).logits)
    assert not list(tmp_path.glob("*.partial"))


def test_pt_checkpoint_is_plain_weights_only_data(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", small_abmil(), META)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "milkit-checkpoint" and raw["meta"]["in_dim"] == 8
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "best.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": _Evil(target)}, fh)
    with pytest.raises(MilkitError, match="refusing to load checkpoint") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    assert not target.exists()
    # the same payload inside torch's zip format
    bad_zip = tmp_path / "last.pt"
    torch.save({"format": "milkit-train-state", "model": _Evil(target)}, bad_zip)
    with pytest.raises(MilkitError, match="refusing to load checkpoint"):
        load_train_state(bad_zip)
    assert not target.exists()


def test_unreadable_missing_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(MilkitError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "best.pt", small_abmil(), META)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MilkitError, match="cannot read checkpoint"):
        load_checkpoint(truncated)
    other = small_abmil(dim=6)
    with pytest.raises(MilkitError, match="checkpoint weights do not fit the model"):
        load_checkpoint(path, model=other)
    wrong = dict(META, model_name="abmill")
    path2 = save_checkpoint(tmp_path / "wrong.pt", small_abmil(), wrong)
    with pytest.raises(MilkitError, match=r"cannot rebuild the checkpoint's model.*abmil"):
        load_checkpoint(path2)
    torch.save({"weights": torch.zeros(2), "note": "x"}, tmp_path / "foreign.pt")
    with pytest.raises(MilkitError, match="not a milkit checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_bare_state_dict_loads_into_a_given_model(tmp_path):
    model = small_abmil(seed=1)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = small_abmil(seed=2)
    loaded, meta = load_checkpoint(tmp_path / "sd.pt", model=other)
    assert meta == {} and state_equal(loaded, model)


def test_plain_rejects_objects_and_converts_paths():
    assert plain({"p": Path("/x"), "t": (1, 2.0, None)}) == {"p": "/x", "t": [1, 2.0, None]}
    with pytest.raises(TypeError, match=r"meta\.bad: object"):
        plain({"bad": object()})


def test_train_state_round_trip_keeps_rng_tensors(tmp_path):
    state = {"epoch": 3, "rng": {"torch": torch.get_rng_state()}, "history": [{"a": 1.0}]}
    save_train_state(tmp_path / "last.pt", state)
    back = load_train_state(tmp_path / "last.pt")
    assert back["epoch"] == 3 and torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    save_checkpoint(tmp_path / "best.pt", small_abmil(), META)
    with pytest.raises(MilkitError, match="not a milkit training state"):
        load_train_state(tmp_path / "best.pt")
    assert os.path.exists(tmp_path / "best.pt")
