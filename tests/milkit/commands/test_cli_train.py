"""CLI: milkit train / evaluate / predict / heatmap / models end to end, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from milkit.cli import main
from tests.milkit.training._train_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.milkit.training.test_cv import make_cohort

TRAIN = ["--model", "abmil", "--model-arg", "fc_dim=16", "--model-arg", "attn_dim=8",
         "--epochs", "3", "--lr", "0.02", "--no-progress", "--seed", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    csv, bags = make_cohort(root, n=18, shift=10.0)
    run = root / "run"
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--folds", "2",
               "--out", str(run), *TRAIN])  # fmt: skip
    assert rc == 0
    return root, csv, bags, run


def test_train_writes_a_complete_run(trained, capsys):
    _, csv, bags, run = trained
    info = json.loads((run / "run.json").read_text())
    assert info["model_kwargs"] == {"fc_dim": 16, "attn_dim": 8}
    assert info["train_config"]["epochs"] == 3 and info["train_config"]["lr"] == 0.02
    assert info["bags_dir"] == str(bags) and info["labels_csv"] == str(csv)
    for k in (0, 1):
        assert (run / f"fold_{k}" / "best.pt").exists()
        assert len(pd.read_csv(run / f"fold_{k}" / "log.csv")) == 3
    summary = pd.read_csv(run / "summary.csv")
    assert list(summary["fold"].astype(str)) == ["0", "1", "mean", "std", "pooled"]
    # --resume on a finished run retrains nothing and prints the same summary
    stamp = (run / "fold_1" / "best.pt").stat().st_mtime_ns
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--out", str(run),
               "--resume", *TRAIN])  # fmt: skip
    assert rc == 0 and (run / "fold_1" / "best.pt").stat().st_mtime_ns == stamp
    out = capsys.readouterr().out
    assert "auc" in out and "pooled out-of-fold" in out and "lowest val_loss" in out


def test_evaluate_prints_folds_and_mean_std(trained, capsys, tmp_path):
    _, _, _, run = trained
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--run", str(run), "--bootstrap", "30", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "mean" in text and "±" in text and "pooled" in text
    res = json.loads(out_json.read_text())
    stored = [json.loads((run / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert [m["auc"] for m in res["folds"]] == pytest.approx([m["auc"] for m in stored])
    assert res["summary"]["auc"]["mean"] == pytest.approx(np.mean([m["auc"] for m in stored]))


def test_predict_ensemble_single_fold_and_with_labels(trained, tmp_path, capsys):
    _, csv, bags, run = trained
    out_all, out_0 = tmp_path / "all.csv", tmp_path / "f0.csv"
    assert main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out_all)]) == 0
    assert main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out_0),
                 "--fold", "0"]) == 0  # fmt: skip
    a, f0 = pd.read_csv(out_all), pd.read_csv(out_0)
    assert list(a.columns) == ["slide_id", "pred", "prob_benign", "prob_tumour"]
    assert len(a) == 18 and set(a["pred"]) <= {"benign", "tumour"}
    out_1 = tmp_path / "f1.csv"
    main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out_1), "--fold", "1"])
    f1 = pd.read_csv(out_1)
    np.testing.assert_allclose(a["prob_tumour"], (f0["prob_tumour"] + f1["prob_tumour"]) / 2,
                               rtol=1e-5)  # fmt: skip
    out_l = tmp_path / "lab.csv"
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(out_l),
               "--labels", str(csv)])  # fmt: skip
    assert rc == 0 and "label" in pd.read_csv(out_l).columns
    assert "auc" in capsys.readouterr().out


def test_heatmap_without_slide_draws_attention(trained, tmp_path):
    _, _, bags, run = trained
    out = tmp_path / "s001.png"
    assert main(["heatmap", "--run", str(run), "--bag", str(bags / "s001.h5"),
                 "--out", str(out), "--fold", "0"]) == 0  # fmt: skip
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 10 and img.std() > 0


def test_models_lists_registered_aggregators(capsys):
    assert main(["models", "abmil*"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("abmil ") and "Ilse" in out
    assert "transmil" not in out
    assert main(["models", "no-such-*"]) == 1


@pytest.mark.parametrize("cmd", ["train", "evaluate", "predict", "heatmap", "models"])
def test_help_shows_an_example(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "example:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model_args", "needle"),
    [(["--model", "abmill"], "unknown aggregator, got 'abmill'. Did you mean: abmil"),
     (["--model", "abmil", "--model-arg", "hiden=3"], "abmil: unknown parameter(s) ['hiden']")],
)  # fmt: skip
def test_model_name_and_arguments_are_checked_before_labels_and_bags(model_args, needle,
                                                                     tmp_path, capsys):  # fmt: skip
    # A typo in --model or --model-arg is reported first, not after reading a large cohort (the
    # labels file and bags folder here do not even exist).
    argv = ["train", "--bags", str(tmp_path / "no_bags"), "--labels", str(tmp_path / "no.csv"),
            "--out", str(tmp_path / "r"), *model_args]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "no.csv" not in err and "no_bags" not in err, err


def test_user_errors_are_one_clear_line(trained, tmp_path, capsys):
    _, csv, bags, run = trained
    bad = tmp_path / "labels.csv"
    bad.write_text("slide_id,label\ns000,benign\nmissing_slide,tumour\n")
    cases = [
        (["train", "--bags", str(bags), "--labels", str(bad), "--out", str(tmp_path / "r"),
          "--model", "abmil"], "missing_slide"),
        (["train", "--bags", str(bags), "--labels", str(csv), "--out", str(tmp_path / "r"),
          "--model", "abmli"], "abmil"),
        (["train", "--bags", str(bags), "--labels", str(csv), "--out", str(tmp_path / "r"),
          "--model", "abmil", "--model-arg", "hidden=3"], "accepted parameters"),
        (["train", "--bags", str(bags), "--labels", str(csv), "--out", str(run),
          "--model", "abmil"], "--resume"),
        (["evaluate", "--run", str(tmp_path / "nope")], "not a milkit run folder"),
        (["predict", "--run", str(run), "--bags", str(bags), "--out", str(tmp_path / "p.csv"),
          "--fold", "7"], "Available folds: 0, 1"),
    ]  # fmt: skip
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) <= 2, err
        assert "Traceback" not in err
    assert not (tmp_path / "r").exists()
