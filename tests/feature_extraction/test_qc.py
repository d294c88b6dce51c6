"""QC thumbnails: PNG on disk with tissue outline and tile boxes, written atomically."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from milkit.feature_extraction.qc import TILE_RGB, TISSUE_RGB, draw_qc, save_qc_thumbnail
from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import make_synthetic_slide
from milkit.feature_extraction.tiling import TileSpec, plan_tiles
from milkit.feature_extraction.tissue import TissueMask, TissueParams, segment_tissue

from milkit.errors import MilkitError


def _count(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(img.astype(int) - np.array(rgb)).sum(axis=-1) <= 30).sum())


def test_qc_png_has_outline_and_grid(tmp_path: Path) -> None:
    truth = make_synthetic_slide(tmp_path / "q.svs", 3000, 2000, seed=3)
    out = tmp_path / "qc" / "q.png"
    with Slide(truth.path) as s:
        tissue = segment_tissue(s)
        grid = plan_tiles(s, tissue, TileSpec())
        assert save_qc_thumbnail(s, tissue, grid, out, max_size=600) == out
        save_qc_thumbnail(s, tissue, None, tmp_path / "nogrid.png", max_size=600)
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert img.shape == (400, 600, 3)
    assert _count(img, TILE_RGB) > 500 and _count(img, TISSUE_RGB) > 200
    plain = cv2.cvtColor(cv2.imread(str(tmp_path / "nogrid.png")), cv2.COLOR_BGR2RGB)
    assert _count(plain, TILE_RGB) == 0 and _count(plain, TISSUE_RGB) > 200
    assert not list(tmp_path.rglob("*.partial"))


def test_tile_boxes_land_where_the_tiles_are() -> None:
    thumb = np.full((100, 200, 3), 255, dtype=np.uint8)
    mask = np.zeros((10, 20), dtype=bool)
    tissue = TissueMask(mask, (100.0, 100.0), TissueParams())

    class Grid:  # only what draw_qc reads
        coords = np.array([[1000, 500]])
        patch_size_level0 = 300

    img = draw_qc(thumb, (2000, 1000), tissue, Grid())  # type: ignore[arg-type]
    ys, xs = np.nonzero((img != 255).any(axis=-1))
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (100, 50, 129, 79)


def test_qc_rejects_non_png(tmp_path: Path, slides_dir: Path) -> None:
    with Slide(slides_dir / "synthetic" / "small.svs") as s:
        tissue = TissueMask(np.zeros((2, 2), dtype=bool), (8.0, 8.0), TissueParams())
        with pytest.raises(MilkitError, match="PNG"):
            save_qc_thumbnail(s, tissue, None, tmp_path / "x.jpg")
