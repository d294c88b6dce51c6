"""The assumption-check harness: statistics, verdict rule, and real trained verdicts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from milkit import models
from milkit.assumptions.runner import (
    DID_NOT_LEARN,
    ERROR,
    FAIL,
    PASS,
    Candidate,
    CheckConfig,
    auc_score,
    bootstrap_mean_auc,
    check_overrides,
    run_checks,
    verdict,
)
from milkit.errors import MilkitError
from milkit.models.base import MILModel, MILOutput, check_bag_input

# The checks validate on the training draw on purpose: the trainer's "validation AUC saturated"
# warning is meant for held-out sets and must not reach users of `milkit check`.
pytestmark = pytest.mark.filterwarnings("error:validation AUC saturated")


class MeanPool(MILModel):
    """Shortcut-capable model: mean of instance embeddings, then a linear head."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, 32
        self.net = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        mask = check_bag_input(x, mask, model="meanpool")
        h = self.net(x)
        w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        z = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        return MILOutput(logits=self.head(z), embedding=z)


# Small, fast settings (200 bags, batch 8 ≈ the step count of the 400-bag default at batch 16).
FAST = {
    "num_train": 200,
    "num_test": 200,
    "batch_size": 8,
    "lr": 3e-3,
    "epochs": 20,
    "patience": 4,
    "n_boot": 200,
    "seeds": (0,),
}


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=4, max_size=40),
    seed=st.integers(0, 1000),
)
def test_auc_matches_sklearn_including_ties(labels: list[int], seed: int) -> None:
    y = np.array(labels)
    scores = np.random.default_rng(seed).integers(0, 4, size=len(y)).astype(float)  # many ties
    if y.min() == y.max():
        assert np.isnan(auc_score(y, scores))
    else:
        assert auc_score(y, scores) == pytest.approx(roc_auc_score(y, scores))


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([0, 1], n // 2)
        return y, y * 0.8 + rng.normal(0, 1, n)

    small = [draw(40) for _ in range(3)]
    big = [draw(800) for _ in range(3)]
    mean_small = np.mean([auc_score(*d) for d in small])
    lo, hi = bootstrap_mean_auc(small, n_boot=500)
    assert lo < mean_small < hi
    lo_big, hi_big = bootstrap_mean_auc(big, n_boot=500)
    assert hi_big - lo_big < (hi - lo) / 2
    assert bootstrap_mean_auc(small, n_boot=300) == bootstrap_mean_auc(small, n_boot=300)


def test_verdict_rule() -> None:
    rule = {"threshold": 0.9, "delta": 0.1}
    assert verdict(1.0, 0.05, 0.1, **rule) == FAIL
    assert verdict(1.0, 0.45, 0.49, **rule) == FAIL  # CI entirely below chance
    assert verdict(0.7, 0.2, 0.3, **rule) == FAIL  # a shortcut shows even in a partial fit
    assert verdict(1.0, 0.45, 0.6, **rule) == PASS
    assert verdict(0.8, 0.6, 0.7, **rule) == DID_NOT_LEARN
    assert verdict(float("nan"), 0.6, 0.7, **rule) == ERROR


def test_config_validation() -> None:
    with pytest.raises(MilkitError, match="unknown assumption test"):
        CheckConfig(tests=("t4",))
    with pytest.raises(MilkitError, match="seed"):
        CheckConfig(seeds=())


def test_overrides_table_and_generic_width_rule() -> None:
    assert check_overrides("mi-net") == {"hidden": (64, 32), "dropout": 0.0}
    assert check_overrides("mi-net", CheckConfig(small=False)) == {}
    custom = CheckConfig(overrides={"mi-net": {"hidden": (8,)}})
    assert check_overrides("mi-net", custom) == {"hidden": (8,)}
    if "abmil" in models.list_models():  # generic rule: big integer widths shrink to 64
        over = check_overrides("abmil")
        assert over and all(v == 64 for v in over.values())
        models.create("abmil", 16, 2, **over)  # and the model accepts them


def test_crashing_candidate_is_an_error_row_and_the_run_goes_on() -> None:
    class Broken(MeanPool):
        def forward(self, x, mask=None, coords=None):
            raise RuntimeError("kaput")

    cfg = CheckConfig(tests=("t1",), **{**FAST, "num_train": 20, "num_test": 20, "epochs": 1})
    results = run_checks(
        [Candidate("broken", Broken), Candidate("meanpool", MeanPool)], cfg, progress=False
    )
    assert results[0].verdict == ERROR
    assert "kaput" in results[0].error
    assert results[1].verdict != ERROR


@pytest.mark.slow
def test_mean_pooling_fails_t1_and_minet_passes_it() -> None:
    cfg = CheckConfig(tests=("t1",), **FAST)
    seen = []
    mean_res, minet_res = run_checks(
        [Candidate("meanpool", MeanPool), "mi-net"], cfg, progress=False, on_result=seen.append
    )
    assert len(seen) == 2
    # the shortcut user fits the training draw and ranks the shifted test draw below chance
    assert mean_res.train_auc > 0.95 and mean_res.test_auc < 0.2
    assert mean_res.verdict == FAIL and mean_res.ci_high < 0.5
    assert minet_res.mil_respecting and minet_res.train_auc > 0.9
    assert minet_res.verdict == PASS and minet_res.test_auc > 0.6
    row = minet_res.to_dict()
    assert row["overrides"] == {"hidden": [64, 32], "dropout": 0.0}
    assert row["per_seed"][0]["seed"] == 0 and row["per_seed"][0]["epochs"] >= 1


@pytest.mark.slow
def test_threshold_mil_learns_and_passes_t2_and_t3() -> None:
    cfg = CheckConfig(tests=("t2", "t3"), **FAST)
    t2, t3 = run_checks(["threshold-mil"], cfg, progress=False)
    for res in (t2, t3):
        assert res.verdict == PASS, res.to_dict()
        assert res.train_auc > 0.95 and res.test_auc > 0.8


def _fake_result(model: str, test: str, verdict_: str, respecting: bool):
    from milkit.assumptions.runner import SeedResult, TestResult

    seed = SeedResult(0, 1.0, 0.1, 3, 0.5, np.array([0, 1]), np.array([0.9, 0.1]))
    return TestResult(model, test, verdict_, 1.0, 0.1, 0.0, 0.2, respecting, {}, [seed], 0.5)


def test_report_files_and_tables(tmp_path) -> None:
    import json

    from milkit.assumptions.report import markdown_table, save_report, text_table

    results = [
        _fake_result("abmil", "t1", FAIL, False),
        _fake_result("mi-net", "t1", PASS, True),
        _fake_result("abmil", "t2", ERROR, False),
    ]
    results[2].test_auc = float("nan")
    paths = save_report(results, tmp_path, config={"delta": 0.1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.csv",
        "report.json",
        "report.md",
        "report.png",
    ]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert data["results"][2]["test_auc"] is None
    assert data["results"][0]["per_seed"][0]["train_auc"] == 1.0
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("model,test,verdict") and len(csv_lines) == 4
    md = markdown_table(results)
    assert "| `abmil` | no |" in md and "1.000 / 0.100 [0.000, 0.200] FAIL" in md
    assert "mi-net *" in text_table(results)


def test_cli_check_writes_report_and_exit_codes(tmp_path, monkeypatch, capsys) -> None:
    from milkit import cli
    from milkit.assumptions import runner

    argv = ["check", "--model", "mi-net", "--tests", "t1", "--seeds", "1", "--num-train", "30"]
    argv += ["--num-test", "30", "--epochs", "1", "--out", str(tmp_path / "a"), "--quiet"]
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert "mi-net *" in out and (tmp_path / "a" / "report.md").exists()
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Property checks" in md and "monotone_poison" in md
    assert code == 0

    # a mil_respecting model that FAILS makes the command exit 1
    monkeypatch.setattr(
        runner,
        "run_checks",
        lambda names, cfg, progress: [_fake_result("mi-net", "t1", FAIL, True)],
    )
    argv[-2] = str(tmp_path / "b")
    assert cli.main([*argv, "--no-properties"]) == 1
    assert "marked mil_respecting but failed t1" in capsys.readouterr().err


def test_cli_check_rejects_unknown_model_and_empty_selection(capsys) -> None:
    from milkit import cli

    assert cli.main(["check", "--model", "mi-nett"]) == 2
    err = capsys.readouterr().err
    assert "mi-nett" in err and "mi-net" in err
    assert cli.main(["check"]) == 2
    assert "--all" in capsys.readouterr().err


def test_check_says_up_front_how_many_fits_and_about_how_long(
    monkeypatch, capsys, tmp_path
) -> None:
    """`milkit check` prints the fit count and a time estimate before training anything; the
    estimate scales with bags × epochs from one calibration fit, and a model whose calibration
    crashes is named instead of silently counted as free."""
    from milkit import cli
    from milkit.assumptions import runner
    from milkit.commands.check import plan_message

    calls = []

    def fake_train(model, task, cfg, overrides):  # 1 s per fit + 2 s per epoch (32 bags)
        calls.append((model, len(task.train), cfg.epochs))
        if model == "transmil":
            raise RuntimeError("boom")
        return SimpleNamespace(wall_s=1.0 + 2.0 * cfg.epochs + (30.0 if len(calls) == 1 else 0))

    monkeypatch.setattr(runner, "train_and_score", fake_train)
    cfg = runner.CheckConfig(tests=("t1", "t2"), seeds=(0, 1, 2), num_train=320, epochs=10)
    text = plan_message(["abmil", "mi-net", "transmil"], cfg)
    assert "3 model(s) × 2 test(s) × 3 seed(s) = 18 fits of ≤ 10 epochs on 320 bags" in text
    # the first (warm-up) fit's extra 30 s is discarded; per fit (1 + 2 × 10) s × 320 / 32 bags
    # = 210 s, 6 fits per model: 21 min each, 42 min for the two models that calibrated
    assert "about 42 min at most" in text and "abmil 21 min" in text and "mi-net 21 min" in text
    assert "no estimate for transmil" in text
    assert calls[:3] == [("abmil", 32, 1), ("abmil", 32, 1),
                                                    ("abmil", 32, 3)]  # fmt: skip

    monkeypatch.setattr(runner, "run_checks", lambda names, cfg, progress: [])
    cli.main(["check", "--model", "mi-net", "--tests", "t1", "--seeds", "1", "--no-properties",
              "--quiet", "--out", str(tmp_path / "a")])  # fmt: skip
    assert "1 model(s) × 1 test(s) × 1 seed(s) = 1 fits" in capsys.readouterr().err
    cli.main(["check", "--model", "mi-net", "--tests", "t1", "--seeds", "1", "--no-properties",
              "--quiet", "--no-estimate", "--out", str(tmp_path / "b")])  # fmt: skip
    assert "fits of" not in capsys.readouterr().err
