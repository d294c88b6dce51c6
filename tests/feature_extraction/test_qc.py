"""QC thumbnails: PNG on disk with tissue outline, tile boxes, removed ink and a header saying
what was done (slide, tiles, resolutions, preset, ink), written atomically."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from milkit.errors import MilkitError
from milkit.feature_extraction.qc import (
    INK_RGB,
    TILE_RGB,
    TISSUE_RGB,
    draw_qc,
    qc_figure,
    qc_lines,
    save_qc_thumbnail,
)
from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import make_ink_case, make_synthetic_slide
from milkit.feature_extraction.tiling import TileSpec, plan_tiles
from milkit.feature_extraction.tissue import TissueMask, TissueParams, segment_tissue


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
        overlay = draw_qc(s.thumbnail(600), s.dimensions, tissue, grid)
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    # the overlay is the PNG's bottom-left block, pixel for pixel; the header sits above it
    assert overlay.shape == (400, 600, 3) and img.shape[1] == 600 and img.shape[0] > 400 + 60
    np.testing.assert_array_equal(img[-400:, :600], overlay)
    assert _count(overlay, TILE_RGB) > 500 and _count(overlay, TISSUE_RGB) > 200
    plain = cv2.cvtColor(cv2.imread(str(tmp_path / "nogrid.png")), cv2.COLOR_BGR2RGB)[-400:]
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


def _font_px(text) -> float:
    return text.get_fontsize() * text.figure.dpi / 72.0


def test_qc_header_says_what_was_done_and_ink_is_drawn(tmp_path: Path) -> None:
    truth = make_ink_case(tmp_path / "inked.svs")
    with Slide(truth.path) as s:
        tissue = segment_tissue(s)
        grid = plan_tiles(s, tissue, TileSpec())
        lines = qc_lines(s, tissue, grid, preset="default")
        overlay = draw_qc(s.thumbnail(1000), s.dimensions, tissue, grid)
    fig = qc_figure(overlay, lines)
    texts = [t.get_text() for t in fig.texts]
    header = "\n".join(texts)
    assert texts[0] == "inked"  # slide id as the title
    assert f"{len(grid)} tiles of 256 px (overlap 0) at 0.5 µm/px (20×)" in header
    assert "level 0: 4000 × 4000 px at 0.5 µm/px (20×)" in header
    assert "tissue preset: default" in header
    assert f"pen ink removed: {tissue.ink_area_mm2:.3g} mm²" in header and tissue.ink_area_mm2 > 0
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["tissue outline", "hole in tissue", "tile", "pen ink removed"]
    # the removed strokes are drawn in the ink colour, right of the tissue (x > 55 %)
    ink_px = np.abs(overlay.astype(int) - np.array(INK_RGB)).sum(axis=-1) <= 30
    _, xs = np.nonzero(ink_px)
    assert len(xs) > 500 and xs.min() > 0.6 * overlay.shape[1]
    off = qc_lines(s, TissueMask(tissue.mask, tissue.downsample, TissueParams(pen_ink=())), grid)
    assert "pen ink filter: off" in off and "tissue preset: custom" in "\n".join(off)


def test_qc_text_scales_with_the_image() -> None:
    lines = ["slide_1", "12 tiles of 256 px (overlap 0) at 0.5 µm/px (20×), min tissue 0.25"]
    big = qc_figure(np.full((1500, 2000, 3), 240, np.uint8), lines)
    small = qc_figure(np.full((150, 200, 3), 240, np.uint8), lines)
    big_px = [_font_px(t) for t in big.texts] + [_font_px(t) for t in big.legends[0].get_texts()]
    small_px = [_font_px(t) for t in small.texts]
    assert min(big_px) >= 2000 / 60 - 1  # ~33 px on a 2,000-px image, not ~10
    assert _font_px(big.texts[0]) > _font_px(big.texts[1])  # the title stands out
    assert min(small_px) >= 12  # readable floor on tiny thumbnails
    # a thumbnail narrower than the header text gets a wider canvas, never cut-off text
    assert small.get_size_inches()[0] * small.dpi > 200
