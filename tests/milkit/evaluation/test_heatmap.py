"""Heatmaps paint each tile's score where its coordinates say (milkit.evaluation.heatmap)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from milkit.errors import MilkitError
from milkit.evaluation.heatmap import draw_heatmap, heatmap_for_slide
from milkit.io.bags import write_bag

GREY = 200


def _png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(path).convert("RGB"))


def test_tiles_painted_at_their_coordinates(tmp_path: Path) -> None:
    # level 0 is 2000 x 1000 px, thumbnail 200 x 100 (scale 0.1); tiles of 256 px -> 25.6 px
    thumb = np.full((100, 200, 3), GREY, np.uint8)
    coords = np.array([[0, 0], [1000, 500], [1500, 0]])
    scores = np.array([0.0, 1.0, 0.5])
    out = draw_heatmap(thumb, coords, scores, 256, (2000, 1000), tmp_path / "h.png", alpha=0.6)
    img = _png(out).astype(int)
    assert img.shape[0] >= 100 and img.shape[1] > 200  # colour-bar panel on the right
    heat = img[:100, :200]
    jet = matplotlib.colormaps["jet"]

    def expected(v: float) -> np.ndarray:
        return np.rint(0.4 * GREY + 0.6 * np.array(jet(v)[:3]) * 255)

    low, high, mid = heat[10, 10], heat[60, 110], heat[10, 160]
    np.testing.assert_allclose(low, expected(0.0), atol=1)
    np.testing.assert_allclose(high, expected(1.0), atol=1)
    np.testing.assert_allclose(mid, expected(0.5), atol=1)
    assert np.abs(high - low).sum() > 100  # high- and low-score tiles look different
    # the whole high tile rectangle is painted and nothing outside any tile is
    assert (heat[50:75, 100:125] == high).all()
    assert (heat[80:, :100] == GREY).all() and (heat[:, 60:95] == GREY).all()
    assert (heat[0:25, 0:25] == low).all() and (heat[26:50, 0:25] == GREY).all()


def test_overlaps_average_rank_mode_heads_and_title(tmp_path: Path) -> None:
    thumb = np.full((50, 50, 3), GREY, np.uint8)
    coords = np.array([[0, 0], [0, 0], [300, 300]])
    heads = np.array([[0.0, 1.0, 0.2], [0.0, 1.0, 0.2]])  # (H, N): averaged over heads
    out = draw_heatmap(
        thumb,
        coords,
        heads,
        100,
        (500, 500),
        tmp_path / "r.png",
        normalize="rank",
        alpha=1.0,
        title="slide A",
    )
    img = _png(out)
    assert img.shape[0] > 160  # title band below the heatmap body
    jet = matplotlib.colormaps["jet"]
    # ranks 0.5/3 and 2.5/3 overlap on the first tile -> mean 0.5; the third tile has rank 1.5/3
    np.testing.assert_allclose(img[5, 5], np.array(jet(0.5)[:3]) * 255, atol=1)
    np.testing.assert_allclose(img[35, 35], np.array(jet(0.5)[:3]) * 255, atol=1)
    none = draw_heatmap(
        thumb, coords[:1], [2.0], 100, (500, 500), tmp_path / "n.png", normalize="none", alpha=1.0
    )
    np.testing.assert_allclose(_png(none)[5, 5], np.array(jet(1.0)[:3]) * 255, atol=1)


def test_bad_inputs(tmp_path: Path) -> None:
    thumb = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(MilkitError, match=r"one score per tile \(2 coords\)"):
        draw_heatmap(thumb, np.zeros((2, 2)), [1.0], 10, (10, 10), tmp_path / "x.png")
    with pytest.raises(MilkitError, match="colour map"):
        draw_heatmap(thumb, np.zeros((1, 2)), [1.0], 10, (10, 10), tmp_path / "x.png", cmap="nah")
    with pytest.raises(MilkitError, match="patch_size_level0"):
        draw_heatmap(thumb, np.zeros((1, 2)), [1.0], 0, (10, 10), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _bag(path: Path, coords: np.ndarray, attrs: dict) -> Path:
    feats = np.zeros((len(coords), 4), np.float32)
    return write_bag(path, feats, coords, coords_attrs=attrs)


def test_heatmap_for_real_slide(tmp_path: Path, slides_dir: Path) -> None:
    slide = slides_dir / "CMU-1-Small-Region.svs"  # 2220 x 2967 level 0
    coords = np.array([[0, 0], [1024, 2048]])
    # named like its slide (a bag named otherwise is refused: tests/milkit/evaluation/test_heatmap_checks.py)
    bag = _bag(tmp_path / "CMU-1-Small-Region.h5", coords, {"patch_size_level0": 512})
    out = heatmap_for_slide(
        slide, bag, [0.0, 1.0], tmp_path / "cmu.png", thumbnail_size=300, alpha=0.7
    )
    img = _png(out).astype(int)
    from milkit.feature_extraction.slides import Slide

    with Slide(slide) as s:
        thumb = s.thumbnail(300).astype(int)
    th, tw = thumb.shape[:2]
    heat = img[:th, :tw]
    sx, sy = tw / 2220, th / 2967
    # outside the tiles the thumbnail is unchanged; inside both tiles it is not
    ys, xs = int(1500 * sy), int(1800 * sx)
    assert (heat[ys, xs] == thumb[ys, xs]).all()
    hy, hx = int((2048 + 256) * sy), int((1024 + 256) * sx)
    ly, lx = int(256 * sy), int(256 * sx)
    assert np.abs(heat[hy, hx] - heat[ly, lx]).sum() > 100
    jet_red = np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255
    np.testing.assert_allclose(heat[hy, hx], 0.3 * thumb[hy, hx] + 0.7 * jet_red, atol=2)


def test_heatmap_without_slide_uses_blank_canvas(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    attrs = {"patch_size_level0": 256, "level0_width": 4000, "level0_height": 1000}
    bag = _bag(tmp_path / "s.h5", coords, attrs)
    out = heatmap_for_slide(None, bag, [0.1, 0.9, 0.5], tmp_path / "s.png", thumbnail_size=400)
    img = _png(out)
    assert img.shape[1] == 400 + 90  # 4:1 aspect canvas of 400 x 100 + colour-bar panel
    assert (img[60:100, 100:400] == 235).all()  # blank canvas away from the tiles
    assert not (img[5, 5] == 235).all()
    # CLAM-style attributes (patch_size x downsample) and no attributes (grid step) also work
    clam = _bag(tmp_path / "c.h5", coords, {"patch_size": 128, "downsample": [2.0, 2.0]})
    assert heatmap_for_slide(None, clam, [1, 2, 3], tmp_path / "c.png").exists()
    bare = _bag(tmp_path / "b.h5", coords, {})
    assert heatmap_for_slide(None, bare, [1, 2, 3], tmp_path / "b.png").exists()
