"""``--bags`` accepts TRIDENT job/tiling folders and CLAM feature folders (milkit.io.bag_folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from milkit.cli import main
from milkit.data.labels import load_labels
from milkit.errors import MilkitError
from milkit.io.bag_folders import resolve_bag_folder
from milkit.io.bags import write_bag
from tests.milkit.training._train_helpers import one_thread  # noqa: F401 (autouse fixture)

IDS = ("TCGA-01", "TCGA-02", "TCGA-03", "TCGA-04", "TCGA-05", "TCGA-06")
TILING = "20x_256px_0px_overlap"


def _write(folder: Path, ids=IDS, dim: int = 6, n: int = 4, pt: bool = False) -> None:
    rng = np.random.default_rng(len(ids) + dim)
    for i, sid in enumerate(ids):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x[:, 0] += 6.0 * (i % 2)  # separable: the CLI test trains on these
        if pt:  # CLAM's pt_files / TRIDENT saveas='pt'
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(x), folder / f"{sid}.pt")
        else:
            coords = np.stack([np.arange(n) * 256, np.zeros(n, np.int64)], 1)
            write_bag(folder / f"{sid}.h5", x, coords)


def _trident_job(root: Path, encoders=("uni_v1",), tilings=(TILING,)) -> Path:
    """A TRIDENT job folder: patches/, features_<enc>/, slide_features_<enc>/, thumbnails/."""
    job = root / "job"
    for tiling in tilings:
        for enc in encoders:
            _write(job / tiling / f"features_{enc}")
            _write(job / tiling / f"slide_features_{enc}", n=1)  # not bags: must be ignored
        patches = job / tiling / "patches"
        patches.mkdir(parents=True)
        (patches / "TCGA-01_patches.h5").write_bytes(b"")
    (job / "thumbnails").mkdir()
    return job


def _labels(root: Path) -> Path:
    csv = root / "labels.csv"
    rows = [{"slide_id": s, "label": ["a", "b"][i % 2]} for i, s in enumerate(IDS)]
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_flat_folder_is_used_as_given(tmp_path):
    _write(tmp_path / "bags")
    (tmp_path / "bags" / "qc").mkdir()  # milkit preprocess writes qc/ beside the bags
    got = resolve_bag_folder(tmp_path / "bags")
    assert (got.path, got.layout, got.num_bags, got.note) == (tmp_path / "bags", "flat", 6, None)


@pytest.mark.parametrize(
    "given",
    ["job", f"job/{TILING}", f"job/{TILING}/features_uni_v1"],
    ids=["job", "tiling", "features"],
)
def test_trident_job_tiling_and_features_folders(tmp_path, given):
    job = _trident_job(tmp_path)
    got = resolve_bag_folder(tmp_path / given)
    assert got.path == job / TILING / "features_uni_v1"
    assert got.num_bags == len(IDS)
    if given.endswith("features_uni_v1"):
        assert got.layout == "flat" and got.note is None
    else:
        assert "TRIDENT" in got.note and str(got.path) in got.note


@pytest.mark.parametrize(
    ("encoders", "tilings", "expect"),
    [
        (("uni_v1", "conch_v15"), (TILING,), ["features_uni_v1", "features_conch_v15"]),
        (("uni_v1",), (TILING, "10x_256px_0px_overlap"), [TILING, "10x_256px_0px_overlap"]),
    ],
    ids=["two-encoders", "two-magnifications"],
)
def test_two_candidates_are_listed_not_guessed(tmp_path, encoders, tilings, expect):
    job = _trident_job(tmp_path, encoders, tilings)
    for folder in (job, job / TILING) if len(encoders) > 1 else (job,):
        with pytest.raises(MilkitError) as err:
            resolve_bag_folder(folder, flag="--bags")
        msg = str(err.value)
        assert all(name in msg for name in expect), msg
        assert "(6 bags)" in msg and "Pick one: --bags " in msg
        assert "slide_features" not in msg.split(". Pick")[0]


def test_clam_feature_folder(tmp_path):
    feat = tmp_path / "feat"
    _write(feat / "pt_files", pt=True)
    got = resolve_bag_folder(feat)
    assert got.path == feat / "pt_files" and got.layout == "clam" and "CLAM" in got.note
    _write(feat / "h5_files")  # the same slides and shapes: h5 (with coords) is preferred
    assert resolve_bag_folder(feat).path == feat / "h5_files"
    assert resolve_bag_folder(feat / "pt_files").path == feat / "pt_files"


def test_clam_h5_and_pt_that_disagree_are_refused(tmp_path):
    feat = tmp_path / "feat"
    _write(feat / "h5_files")
    _write(feat / "pt_files", ids=IDS[:4], pt=True)
    with pytest.raises(MilkitError, match=r"different slides.*h5_files only: \['TCGA-05'"):
        resolve_bag_folder(feat)
    other = tmp_path / "other"
    _write(other / "h5_files")
    _write(other / "pt_files", dim=9, pt=True)  # another encoder's features
    with pytest.raises(MilkitError, match=r"different bags; TCGA-01: 4x6 in h5_files, 4x9"):
        resolve_bag_folder(other)


def test_bags_beside_a_bag_subfolder_are_ambiguous(tmp_path):
    _write(tmp_path / "bags")
    _write(tmp_path / "bags" / "h5_files", ids=IDS[:2])
    with pytest.raises(MilkitError, match=r"\. \(6 bags\), h5_files \(2 bags\)"):
        resolve_bag_folder(tmp_path / "bags")


def test_no_bags_says_where_milkit_looked(tmp_path):
    job = tmp_path / "job"
    (job / TILING / "patches").mkdir(parents=True)  # tiled, never featurised
    _write(job / "somewhere_else", ids=IDS[:1])
    with pytest.raises(MilkitError) as err:
        resolve_bag_folder(job)
    msg = str(err.value)
    for place in ("h5_files/", "pt_files/", "features_<encoder>/", "px_overlap/features_"):
        assert place in msg
    assert "somewhere_else (1 bags)" in msg and "patches/ hold coords only" in msg
    with pytest.raises(MilkitError, match="TRIDENT's patches/ folder"):
        resolve_bag_folder(job / TILING / "patches")
    with pytest.raises(MilkitError, match="bags folder not found"):
        resolve_bag_folder(tmp_path / "nope")
    with pytest.raises(MilkitError, match="got a file"):
        resolve_bag_folder(job / "somewhere_else" / "TCGA-01.h5")


def test_load_labels_reads_a_trident_job_and_says_so(tmp_path):
    """Before: 'missing bag (6)' for a TRIDENT job folder."""
    job = _trident_job(tmp_path)
    table = load_labels(_labels(tmp_path), job)
    assert table.bags_dir == job / TILING / "features_uni_v1" and len(table) == 6
    assert any("TRIDENT job folder" in n for n in table.notes)


def test_missing_bag_error_says_where_it_looked(tmp_path):
    _write(tmp_path / "bags", ids=("TCGA-01-slide", "TCGA-02-slide"))
    with pytest.raises(MilkitError) as err:
        load_labels(_labels(tmp_path), tmp_path / "bags")
    msg = str(err.value)
    assert f"milkit looked for {tmp_path / 'bags' / 'TCGA-01.h5'}" in msg
    assert "TCGA-01.pt" in msg and "holds 2 bag(s) named like: TCGA-01-slide" in msg


@pytest.mark.slow
def test_cli_train_predict_export_accept_trees(tmp_path, capsys):
    job = _trident_job(tmp_path)
    features = job / TILING / "features_uni_v1"
    csv, run = _labels(tmp_path), tmp_path / "run"
    rc = main(["train", "--bags", str(job), "--labels", str(csv), "--out", str(run),
               "--folds", "2", "--model", "abmil", "--model-arg", "fc_dim=8",
               "--model-arg", "attn_dim=4", "--epochs", "1", "--no-progress"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert f"milkit train: note: {job} is a TRIDENT job folder" in err
    assert err.count("TRIDENT job folder") == 1  # said once, not again by load_labels
    assert json.loads((run / "run.json").read_text())["bags_dir"] == str(features)

    preds = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run), "--bags", str(job / TILING),
                 "--out", str(preds)]) == 0  # fmt: skip
    assert sorted(pd.read_csv(preds)["slide_id"]) == list(IDS)
    assert "TRIDENT tiling folder" in capsys.readouterr().err

    rc = main(["report", "--run", str(run), "--bags", str(job), "--bootstrap", "0",
               "--out", str(tmp_path / "report")])  # fmt: skip
    assert rc == 0 and "milkit report: note:" in capsys.readouterr().err

    out = tmp_path / "clam"
    assert main(["export", "--to", "clam", str(job), str(out)]) == 0
    assert len(list((out / "pt_files").glob("*.pt"))) == 6
    # and the CLAM folder just written is itself a --bags folder (h5 and pt agree)
    assert resolve_bag_folder(out).path == out / "h5_files"

    _trident_job(tmp_path / "two", encoders=("uni_v1", "conch_v15"))
    rc = main(["predict", "--run", str(run), "--bags", str(tmp_path / "two" / "job"),
               "--out", str(preds)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "features_conch_v15 (6 bags)" in err and "Pick one: --bags" in err
