"""Per-tile scores and top-k tiles out of a run: `milkit predict --attention` and `milkit heatmap
--scores/--top-k` (issue 12, item 6), as CLAM's create_heatmaps and TRIDENT's top-k export."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from milkit.cli import main
from milkit.errors import MilkitError
from milkit.evaluation.attention_export import read_tile_scores, write_tile_scores
from milkit.io.bags import read_bag
from milkit.training.inference import attention_scores
from tests.milkit.evaluation.test_heatmap_checks import CMU_ID, _cmu_bag
from tests.milkit.training._train_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.milkit.training.test_cv import make_cohort


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn")
    csv, bags = make_cohort(root, n=12, shift=10.0)
    run = root / "run"
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--folds", "2", "--out",
               str(run), "--model", "abmil", "--model-arg", "fc_dim=8", "--model-arg",
               "attn_dim=4", "--epochs", "2", "--no-progress", "--seed", "0"])  # fmt: skip
    assert rc == 0
    return run, bags


def test_predict_writes_fold_ensembled_attention_per_slide(trained, tmp_path) -> None:
    run, bags = trained
    out = tmp_path / "attention"
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out",
               str(tmp_path / "p.csv"), "--attention", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    files = sorted(out.glob("*.csv"))
    assert [f.stem for f in files] == sorted(p.stem for p in bags.glob("*.h5"))
    for f in files[:3]:
        table = pd.read_csv(f)
        bag = read_bag(bags / f"{f.stem}.h5")
        assert list(table.columns) == ["slide_id", "tile", "x", "y", "score", "rank"]
        assert (table["slide_id"] == f.stem).all() and len(table) == len(bag.coords)
        np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), bag.coords)
        assert table["score"].sum() == pytest.approx(1.0, abs=1e-5)  # softmax attention
        assert table.loc[table["score"].idxmax(), "rank"] == 1
        # the same fold-mean attention as `milkit heatmap` computes for the bag
        expected, _, _ = attention_scores(run, bags / f"{f.stem}.h5", device="cpu")
        np.testing.assert_allclose(table["score"], expected, rtol=1e-6, atol=1e-9)
    # one fold only: that fold's attention, which differs from the ensemble
    one = tmp_path / "fold0"
    assert main(["predict", "--run", str(run), "--bags", str(bags), "--out",
                 str(tmp_path / "p0.csv"), "--attention", str(one), "--fold", "0",
                 "--attention-format", "h5"]) == 0  # fmt: skip
    _, scores = read_tile_scores(one / f"{files[0].stem}.h5")
    fold0, _, _ = attention_scores(run, bags / f"{files[0].stem}.h5", fold="0", device="cpu")
    np.testing.assert_allclose(scores, fold0, rtol=1e-5)
    with h5py.File(one / f"{files[0].stem}.h5") as f:
        assert f.attrs["kind"] == "attention" and f.attrs["fold"] == "0"
        assert f.attrs["coords_frame"] == "level0_px_top_left"


def test_predict_attention_refuses_a_subsampled_bag(trained, tmp_path, capsys) -> None:
    run, bags = trained
    rc = main(["predict", "--run", str(run), "--bags", str(bags), "--out", str(tmp_path / "p.csv"),
               "--attention", str(tmp_path / "a"), "--max-instances", "3"])  # fmt: skip
    assert rc == 2 and "every tile's score" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "p.csv").exists()


def test_heatmap_writes_scores_and_top_tiles(trained, slides_dir, tmp_path, capsys) -> None:
    run, _ = trained
    cmu = slides_dir / "CMU-1-Small-Region.svs"
    bag = _cmu_bag(tmp_path / f"{CMU_ID}.h5", cmu, n=6)
    out = tmp_path / "hm.png"
    rc = main(["heatmap", "--run", str(run), "--bag", str(bag), "--slide", str(cmu),
               "--out", str(out), "--device", "cpu", "--scores", str(tmp_path / "s.h5"),
               "--top-k", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    coords, scores = read_tile_scores(tmp_path / "s.h5")
    np.testing.assert_array_equal(coords, read_bag(bag).coords)
    tiles = sorted((tmp_path / "hm_top_tiles").glob("*.png"))
    assert [t.name for t in tiles] == [f"{CMU_ID}_top{r}.png" for r in (1, 2, 3)]
    # the top-1 tile is the slide's region at the highest-scoring tile's coordinates
    best = coords[int(np.argmax(scores))]
    from milkit.feature_extraction.slides import Slide

    with Slide(cmu) as slide:
        region = np.asarray(slide.read_region((int(best[0]), int(best[1])), 0, (256, 256)))
    top1 = np.asarray(Image.open(tiles[0]).convert("RGB").resize((256, 256)), dtype=float)
    assert np.abs(top1 - region[..., :3]).mean() < 12  # same pixels, resampled twice
    assert main(["heatmap", "--run", str(run), "--bag", str(bag), "--out", str(out),
                 "--top-k", "3"]) == 2  # fmt: skip
    assert "pass --slide" in capsys.readouterr().err


def test_write_tile_scores_checks_its_input(tmp_path) -> None:
    coords = np.array([[0, 0], [256, 0]])
    with pytest.raises(MilkitError, match=r"3 scores for 2 tiles"):
        write_tile_scores(tmp_path / "s.csv", "s", coords, np.ones(3))
    with pytest.raises(MilkitError, match=r"\.csv, \.h5 or \.hdf5"):
        write_tile_scores(tmp_path / "s.json", "s", coords, np.ones(2))
    path = write_tile_scores(tmp_path / "s.csv", "s", coords, np.array([0.2, 0.8]))
    back = pd.read_csv(path)
    assert list(back["rank"]) == [2, 1] and not Path(f"{path}.partial").exists()
