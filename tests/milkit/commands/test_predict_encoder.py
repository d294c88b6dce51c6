"""Bag provenance (issue 9, fault 5): run.json records the cohort's encoder and tile spec, train
refuses a cohort mixing encoders, predict/heatmap refuse bags from another encoder.

``resnet50-trunc`` and UNI are both 1024-d, so only the recorded provenance tells them apart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milkit.cli import main
from milkit.errors import MilkitError
from milkit.io.bags import write_bag
from tests.milkit.training._train_helpers import one_thread, planted_bags  # noqa: F401 (autouse fixture)

TRAIN = ["--model", "abmil", "--model-arg", "fc_dim=8", "--model-arg", "attn_dim=4",
         "--epochs", "1", "--no-progress", "--folds", "2"]  # fmt: skip
UNI = {"encoder": "uni", "encoder_weights_sha256": "a" * 64}
RESNET = {"encoder": "resnet50-trunc", "encoder_weights_sha256": "b" * 64}
TILES = {"tile_spec": json.dumps({"patch_size": 256, "mpp": 0.5, "magnification": None})}


def _write(bags: Path, sid: str, x: np.ndarray, enc: dict | None, tiles: dict | None = TILES,
           patch: int = 256) -> None:  # fmt: skip
    coords = np.stack([np.arange(len(x)) * patch, np.zeros(len(x), dtype=int)], 1)
    write_bag(
        bags / f"{sid}.h5",
        x,
        coords,
        features_attrs=enc,
        coords_attrs={"patch_size": patch, "target_mpp": 0.5012} if enc else None,
        root_attrs=tiles if enc else None,
    )


def _cohort(root: Path, enc_of: dict[int, dict | None], n: int = 8, default=UNI) -> tuple:
    bags_dir = root / "bags"
    bags, labels = planted_bags(n, 8, 0, shift=6.0)
    rows = []
    for i, (x, y) in enumerate(zip(bags, labels, strict=True)):
        _write(bags_dir, f"s{i}", x, enc_of.get(i, default))
        rows.append({"slide_id": f"s{i}", "label": ["benign", "tumour"][y]})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, bags_dir


def test_train_refuses_mixed_encoders_listing_each_group(tmp_path, capsys):
    csv, bags = _cohort(tmp_path, {5: RESNET, 6: RESNET, 7: None})
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--out",
               str(tmp_path / "run"), *TRAIN])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "run").exists()
    assert "bags from different encoders or tile specs (3)" in err
    assert (
        "[encoder=uni weights=aaaaaaaa patch_size=256 resolution=0.5 mpp] 5 slide(s): s0, s1, s2, ..."
        in err
    )
    assert (
        "[encoder=resnet50-trunc weights=bbbbbbbb patch_size=256 resolution=0.5 mpp] 2 slide(s): s5, s6"
        in err
    )
    # an attribute-less bag is a group of its own: it cannot be shown to be UNI
    assert (
        "[encoder=unrecorded weights=unrecorded patch_size=unrecorded resolution=unrecorded] 1 slide(s): s7"
        in err
    )


def test_train_refuses_mixed_tile_specs(tmp_path, capsys):
    csv, bags = _cohort(tmp_path, {})
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    _write(bags, "s0", x, UNI, {"tile_spec": json.dumps({"patch_size": 256, "magnification": 40})})
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--out",
               str(tmp_path / "run"), *TRAIN])  # fmt: skip
    assert rc == 2
    assert "resolution=40x] 1 slide(s): s0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def uni_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    csv, bags = _cohort(root, {})
    run = root / "run"
    assert main(["train", "--bags", str(bags), "--labels", str(csv), "--out", str(run),
                 *TRAIN]) == 0  # fmt: skip
    return root, run


def test_run_json_records_the_bag_spec(uni_run):
    _, run = uni_run
    spec = json.loads((run / "run.json").read_text())["bag_spec"]
    assert spec == {
        "encoder": "uni",
        "encoder_weights_sha256": "a" * 64,
        "feature_dim": 8,
        "patch_size": 256,
        "resolution": "0.5 mpp",
        "target_mpp": [0.5012, 0.5012],
        "target_magnification": None,
        "groups": 1,
    }


def test_predict_refuses_another_encoder_unless_allowed(uni_run, tmp_path, capsys):
    _, run = uni_run
    new = tmp_path / "new"
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    _write(new, "r1", x, RESNET)
    _write(new, "u1", x, UNI)
    out = tmp_path / "p.csv"
    rc = main(["predict", "--run", str(run), "--bags", str(new), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "1 bag(s) come from another encoder or tile spec than the run" in err
    assert (
        "[encoder=resnet50-trunc weights=bbbbbbbb patch_size=256 resolution=0.5 mpp] 1 slide(s): r1"
        in err
    )
    assert "--allow-encoder-mismatch" in err
    rc = main(["predict", "--run", str(run), "--bags", str(new), "--out", str(out),
               "--allow-encoder-mismatch"])  # fmt: skip
    assert rc == 0 and len(pd.read_csv(out)) == 2
    assert "(--allow-encoder-mismatch: used anyway)" in capsys.readouterr().err


def test_predict_refuses_attribute_less_bags_for_a_recorded_run(uni_run, tmp_path, capsys):
    _, run = uni_run
    new = tmp_path / "new"
    _write(new, "plain", np.ones((3, 8), np.float32), None)
    rc = main(["predict", "--run", str(run), "--bags", str(new), "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and "encoder=unrecorded" in capsys.readouterr().err


def test_heatmap_refuses_another_encoder(uni_run, tmp_path):
    from milkit.training.inference import attention_scores

    _, run = uni_run
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    _write(tmp_path, "r1", x, RESNET)
    with pytest.raises(MilkitError, match="another encoder or tile spec"):
        attention_scores(run, tmp_path / "r1.h5", device="cpu")
    scores, _, _ = attention_scores(run, tmp_path / "r1.h5", device="cpu",
                                    allow_encoder_mismatch=True)  # fmt: skip
    assert scores.shape == (5,)


def test_attribute_less_cohort_trains_and_predicts(tmp_path, capsys):
    """Plain h5 bags (other tools, tests) are one 'unrecorded' group: they still work."""
    csv, bags = _cohort(tmp_path, {}, default=None)
    run = tmp_path / "run"
    assert main(["train", "--bags", str(bags), "--labels", str(csv), "--out", str(run),
                 *TRAIN]) == 0  # fmt: skip
    spec = json.loads((run / "run.json").read_text())["bag_spec"]
    assert spec["encoder"] is None and spec["feature_dim"] == 8 and spec["groups"] == 1
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(tmp_path / "p.csv")])
    assert rc == 0


def test_old_run_without_spec_is_not_checked(uni_run, tmp_path, capsys):
    _, run = uni_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    info = json.loads((old / "run.json").read_text())
    del info["bag_spec"]
    (old / "run.json").write_text(json.dumps(info))
    new = tmp_path / "new"
    _write(new, "r1", np.ones((3, 8), np.float32), RESNET)
    rc = main(["predict", "--run", str(old), "--bags", str(new), "--out", str(tmp_path / "p.csv")])
    assert rc == 0
    assert "the bags' encoder was not checked" in capsys.readouterr().err


def test_resume_refuses_bags_from_another_encoder(uni_run, tmp_path, capsys):
    _, run = uni_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    csv, bags = _cohort(tmp_path, {}, default=RESNET)
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--out", str(copy),
               "--resume", *TRAIN])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot resume: the bags come from another encoder or tile spec" in err
    assert "The run was started with encoder='uni'" in err
