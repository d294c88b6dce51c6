"""CLI habits a CLAM/TRIDENT user expects (issue 12, item 8): `--help` shows the defaults that
apply, and the training progress bar says which fold it is on and the last validation numbers."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from milkit.cli import build_parser, main
from milkit.training.config import TrainConfig
from tests.milkit.training._train_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.milkit.training.test_cv import make_cohort


def _parser(command: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _help(command: str) -> str:
    return " ".join(_parser(command).format_help().split())  # unwrap argparse's lines


@pytest.mark.parametrize(
    ("option", "field"),
    [("--epochs", "epochs"), ("--lr", "lr"), ("--weight-decay", "weight_decay"),
     ("--monitor", "monitor"), ("--patience", "patience"), ("--optimizer", "optimizer"),
     ("--scheduler", "scheduler"), ("--seed", "seed")],
)  # fmt: skip
def test_train_help_shows_the_real_defaults(option: str, field: str) -> None:
    default = {f.name: f.default for f in fields(TrainConfig)}[field]
    shown = "none" if default is None else f"{default:g}" if isinstance(default, float) else default
    action = next(a for a in _parser("train")._actions if option in a.option_strings)
    assert f"default {shown}" in action.help, (option, action.help)
    assert "--preset official starts from the paper code's recipe" in _help("train")


def test_bootstrap_help_says_its_default() -> None:
    assert "default 0: none" in _help("train") and "default 0: none" in _help("evaluate")


@pytest.mark.slow
def test_progress_bar_names_the_fold_and_the_last_validation_numbers(tmp_path, capsys) -> None:
    csv, bags = make_cohort(tmp_path, n=16, shift=10.0)
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--out", str(tmp_path / "r"),
               "--folds", "2", "--epochs", "2", "--model", "abmil", "--model-arg", "fc_dim=8",
               "--model-arg", "attn_dim=4", "--jobs", "1"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "fold 1/2 epoch 1/2" in err and "fold 2/2 epoch 2/2" in err
    # the second epoch's bar carries the first epoch's validation loss
    assert re.search(r"fold 1/2 epoch 2/2.*val_loss=\d\.\d{4}", err)
