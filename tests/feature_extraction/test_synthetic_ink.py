"""Synthetic marker ink: drawn where its saved mask says, in its colour, over glass and tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from milkit.errors import MilkitError
from milkit.feature_extraction.synthetic import (
    PEN_RGB,
    PenStroke,
    ink_fraction_of_tiles,
    load_synthetic_masks,
    make_layout,
    make_synthetic_slide,
    render_region,
)


def test_strokes_are_rendered_where_the_ink_mask_says(tmp_path: Path) -> None:
    strokes = (
        PenStroke("blue", ((1500.0, 200.0), (1700.0, 1800.0)), 200.0),
        PenStroke("black", ((300.0, 1000.0), (1200.0, 1000.0)), 100.0),  # over tissue too
    )
    truth = make_synthetic_slide(
        tmp_path / "p.svs", 2000, 2000, seed=2, tissue_box=(0.0, 0.0, 0.6, 1.0), pen_strokes=strokes
    )
    assert truth.ink_mask is not None and set(np.unique(truth.ink_mask)) == {0, 1, 3}
    assert not truth.tissue_mask[:, round(0.6 * truth.tissue_mask.shape[1]) :].any()
    loaded = load_synthetic_masks(truth.path)
    np.testing.assert_array_equal(loaded.ink_mask, truth.ink_mask)
    # stroke width on the layout grid: 200 µm = 400 px = 25 cells of 16 px
    d = truth.mask_downsample
    row = truth.ink_mask[1000 // d] == 1
    assert row.sum() == pytest.approx(200 / (0.5 * d), abs=2)
    s = openslide.OpenSlide(str(truth.path))
    try:
        img = np.asarray(s.read_region((0, 0), 0, (2000, 2000)).convert("RGB")).astype(int)
    finally:
        s.close()
    ref = render_region(truth, 0, 0, 2000, 2000).astype(int)
    assert np.abs(img - ref).mean() < 4.0  # only JPEG loss
    cells = img[: (2000 // d) * d, : (2000 // d) * d].reshape(2000 // d, d, 2000 // d, d, 3)
    cells = cells.mean(axis=(1, 3))
    ink = truth.ink_mask[: 2000 // d, : 2000 // d]
    blue = cells[ink == 1]
    assert np.abs(blue.mean(axis=0) - PEN_RGB["blue"]).max() < 15  # blue ink on glass
    black = cells[(ink == 3)]
    assert black.max() < 90  # black over glass or tissue stays dark
    assert (
        cells[(ink == 0) & ~truth.tissue_mask[: 2000 // d, : 2000 // d]].min(axis=-1) > 230
    ).all()
    coords = np.array([[1536, 1024], [0, 0]])
    frac = ink_fraction_of_tiles(truth, coords, 256)
    assert frac[0] > 0.5 and frac[1] == 0


def test_slides_without_strokes_have_no_ink_and_bad_strokes_are_refused(tmp_path: Path) -> None:
    plain = make_synthetic_slide(tmp_path / "n.svs", 600, 400, seed=1)
    assert plain.ink_mask is None and load_synthetic_masks(plain.path).ink_mask is None
    assert (ink_fraction_of_tiles(plain, np.zeros((3, 2)), 256) == 0).all()
    with pytest.raises(MilkitError, match="unknown pen colour"):
        PenStroke("purple", ((0.0, 0.0),))
    with pytest.raises(MilkitError, match="positive width"):
        PenStroke("blue", ((0.0, 0.0),), 0.0)
    with pytest.raises(MilkitError, match="tissue_box"):
        make_layout(600, 400, tissue_box=(0.5, 0.0, 0.4, 1.0))
