"""Tile grids: geometry, raster order, tissue filter, attributes; property tests on fake slides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import make_synthetic_slide
from milkit.feature_extraction.tiling import (
    LEVEL_TOLERANCE,
    TileSpec,
    choose_read_level,
    expected_tile_count,
    plan_tiles,
    read_tile,
)
from milkit.feature_extraction.tissue import TissueMask, TissueParams, segment_tissue

DESIGN_COORDS_ATTRS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
    "patch_level",
    "downsample",
    "level_dim",
    "downsampled_level_dim",
    "mpp_level0",
    "target_mpp",
    "custom_downsample",
    "coords_frame",
}


@dataclass
class FakeSlide:
    """Just the geometry plan_tiles needs (duck-typed Slide)."""

    dimensions: tuple[int, int]
    level_downsamples: tuple[float, ...]
    mpp: float
    magnification: float
    slide_id: str = "fake"
    path: str = "fake.svs"

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        w, h = self.dimensions
        return tuple((max(1, int(w / d)), max(1, int(h / d))) for d in self.level_downsamples)


def _brute_fraction(mask: np.ndarray, ds: float, x: int, y: int, size: int) -> float:
    """Tissue fraction by explicit level-0 upsampling of the mask (slow reference)."""
    xs = np.floor((x + np.arange(size) + 0.5) / ds).astype(int)
    ys = np.floor((y + np.arange(size) + 0.5) / ds).astype(int)
    ok_x = xs < mask.shape[1]
    ok_y = ys < mask.shape[0]
    vals = np.zeros((size, size))
    vals[np.ix_(ok_y, ok_x)] = mask[np.ix_(ys[ok_y], xs[ok_x])]
    return float(vals.mean())


def _check_grid_invariants(slide, grid, spec: TileSpec) -> None:
    w0, h0 = slide.dimensions
    c = grid.coords
    assert c.dtype == np.int64 and c.ndim == 2 and c.shape[1] == 2
    assert len(grid.tissue_fraction) == len(c)
    # raster order: sorted by y, then x, no duplicates
    order = np.lexsort((c[:, 0], c[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(c)))
    assert len(np.unique(c, axis=0)) == len(c)
    # inside the slide (edge-crossing tiles dropped)
    assert (c >= 0).all()
    assert (c[:, 0] + grid.patch_size_level0 <= w0).all()
    assert (c[:, 1] + grid.patch_size_level0 <= h0).all()
    # on the grid
    overlap0 = round(spec.overlap * grid.target_downsample)
    assert grid.step_level0 == grid.patch_size_level0 - overlap0
    assert (c % grid.step_level0 == 0).all()
    # tissue filter
    if spec.min_tissue > 0:
        assert (grid.tissue_fraction >= spec.min_tissue - 1e-5).all()
    else:
        assert (grid.tissue_fraction > 0).all()
    # read level never coarser than the target; read size reproduces the target scale
    level_ds = slide.level_downsamples[grid.read_level]
    assert level_ds <= grid.target_downsample * (1 + LEVEL_TOLERANCE) + 1e-9
    assert grid.read_size / grid.patch_size * level_ds == pytest.approx(grid.target_downsample)
    assert grid.custom_downsample == pytest.approx(grid.read_size / grid.patch_size)


def test_cmu_small_region_20x_256(slides_dir: Path) -> None:
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        tissue = segment_tissue(s)
        spec = TileSpec(patch_size=256, mpp=0.5, min_tissue=0.25)
        grid = plan_tiles(s, tissue, spec)
        _check_grid_invariants(s, grid, spec)
        # 8 x 11 = 88 positions fit; about a third of the slide is tissue.
        assert expected_tile_count(2220, 2967, 256, 256) == 88
        assert 25 <= len(grid) <= 60
        assert grid.read_level == 0 and grid.read_size == 256 and grid.patch_size_level0 == 256
        assert grid.target_mpp == pytest.approx(0.499)
        for i in (0, len(grid) // 2, len(grid) - 1):
            x, y = grid.coords[i]
            want = _brute_fraction(tissue.mask, tissue.downsample[0], x, y, 256)
            assert grid.tissue_fraction[i] == pytest.approx(want, abs=0.02)
        tile = read_tile(s, grid, 0)
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        x, y = grid.coords[0]
        np.testing.assert_array_equal(tile, s.read_region((x, y), 0, (256, 256)))
        attrs = grid.coords_attrs(s)
        assert set(attrs) >= DESIGN_COORDS_ATTRS
        assert attrs["coords_frame"] == "level0_px_top_left"
        assert attrs["name"] == "CMU-1-Small-Region"
        assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
        # 10x: twice the level-0 footprint, read at level 0 and halved
        g10 = plan_tiles(s, tissue, TileSpec(magnification=10))
        assert g10.patch_size_level0 == 512 and g10.read_size == 512
        assert g10.custom_downsample == pytest.approx(2.0)
        assert g10.target_magnification == pytest.approx(10.0)
        assert read_tile(s, g10, 0).shape == (256, 256, 3)


def test_pyramid_level_used_and_overlap_spacing(tmp_path: Path) -> None:
    truth = make_synthetic_slide(tmp_path / "p.svs", 4096, 3072, mpp=0.25, seed=4)
    with Slide(truth.path) as s:
        tissue = segment_tissue(s)
        spec = TileSpec(patch_size=128, mpp=1.0, overlap=32, min_tissue=0.5)
        grid = plan_tiles(s, tissue, spec)
        _check_grid_invariants(s, grid, spec)
        assert grid.read_level == 1 and grid.read_size == 128  # level 1 is exactly 1 µm/px
        assert grid.patch_size_level0 == 512 and grid.step_level0 == 512 - 128
        xs = np.unique(grid.coords[:, 0])
        assert set(np.diff(xs).tolist()) <= {384 * k for k in range(1, 20)}
        assert read_tile(s, grid, 0).shape == (128, 128, 3)


def test_min_tissue_zero_means_any_overlap_and_empty_mask_gives_no_tiles() -> None:
    slide = FakeSlide((1000, 1000), (1.0,), 0.5, 20.0)
    mask = np.zeros((100, 100), dtype=bool)
    empty = TissueMask(mask, (10.0, 10.0), TissueParams())
    grid = plan_tiles(slide, empty, TileSpec(min_tissue=0.0))
    assert grid.coords.shape == (0, 2) and grid.tissue_fraction.shape == (0,)
    mask = mask.copy()
    mask[50, 50] = True  # one mask pixel = 10 x 10 level-0 px
    one = TissueMask(mask, (10.0, 10.0), TissueParams())
    grid = plan_tiles(slide, one, TileSpec(min_tissue=0.0))
    assert grid.coords.tolist() == [[256, 256]]
    assert grid.tissue_fraction[0] == pytest.approx(100 / 256**2)
    assert len(plan_tiles(slide, one, TileSpec(min_tissue=0.01))) == 0


def test_slide_smaller_than_a_tile() -> None:
    slide = FakeSlide((100, 80), (1.0,), 0.5, 20.0)
    full = TissueMask(np.ones((8, 10), dtype=bool), (10.0, 10.0), TissueParams())
    assert len(plan_tiles(slide, full, TileSpec())) == 0


def test_spec_validation_and_defaults() -> None:
    assert TileSpec().target_downsample(0.25, 40.0) == pytest.approx(2.0)  # 20x default
    with pytest.raises(MilkitError, match="not both"):
        TileSpec(mpp=0.5, magnification=20)
    with pytest.raises(MilkitError, match="overlap"):
        TileSpec(patch_size=256, overlap=256)
    with pytest.raises(MilkitError, match="overlap"):
        TileSpec(overlap=-1)
    with pytest.raises(MilkitError, match="min_tissue"):
        TileSpec(min_tissue=1.5)
    with pytest.raises(MilkitError, match="patch_size"):
        TileSpec(patch_size=4)
    with pytest.raises(MilkitError, match="patch_size"):
        TileSpec(patch_size=256.0)  # type: ignore[arg-type]


def test_finer_than_scan_is_refused() -> None:
    slide = FakeSlide((5000, 5000), (1.0, 4.0), 0.5, 20.0)
    mask = TissueMask(np.ones((50, 50), dtype=bool), (100.0, 100.0), TissueParams())
    with pytest.raises(MilkitError, match="finer than the scan"):
        plan_tiles(slide, mask, TileSpec(mpp=0.25))
    # 0.499 vs 0.5 is within tolerance: native pixels, no resize
    near = FakeSlide((5000, 5000), (1.0, 4.0), 0.499, 20.0)
    grid = plan_tiles(near, mask, TileSpec(mpp=0.5))
    assert grid.read_size == 256 and grid.custom_downsample == 1.0


def test_choose_read_level_tolerates_odd_downsamples() -> None:
    downsamples = (1.0, 2.0, 4.016, 8.086)  # boxes.tiff
    assert choose_read_level(downsamples, 4.0) == 2
    assert choose_read_level(downsamples, 3.9) == 1
    assert choose_read_level(downsamples, 100.0) == 3
    assert choose_read_level(downsamples, 1.0) == 0


@settings(max_examples=40, deadline=None)
@given(
    w0=st.integers(300, 6000),
    h0=st.integers(300, 6000),
    slide_mpp=st.sampled_from([0.2425, 0.25, 0.2738, 0.4990, 0.5, 1.0]),
    pyramid=st.sampled_from([(1.0,), (1.0, 4.0, 16.0), (1.0, 2.0, 4.016, 8.086), (1.0, 3.99)]),
    use_mag=st.booleans(),
    target=st.floats(1.0, 16.0),
    patch_size=st.sampled_from([16, 64, 100, 224, 256]),
    overlap_frac=st.floats(0.0, 0.9),
    min_tissue=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
def test_grid_geometry_property(
    w0, h0, slide_mpp, pyramid, use_mag, target, patch_size, overlap_frac, min_tissue, seed
) -> None:
    slide = FakeSlide((w0, h0), pyramid, slide_mpp, 10.0 / slide_mpp)
    rng = np.random.default_rng(seed)
    ds = 16.0
    mask = rng.random((int(np.ceil(h0 / ds)), int(np.ceil(w0 / ds)))) > 0.4
    tissue = TissueMask(mask, (ds, ds), TissueParams())
    overlap = int(overlap_frac * (patch_size - 1))
    target_ds = target  # target is a level-0 downsample ≥ 1
    if use_mag:
        spec = TileSpec(patch_size, magnification=slide.magnification / target_ds, overlap=overlap)
    else:
        spec = TileSpec(patch_size, mpp=slide_mpp * target_ds, overlap=overlap)
    spec = TileSpec(
        spec.patch_size, spec.mpp, spec.magnification, spec.overlap, min_tissue=min_tissue
    )
    grid = plan_tiles(slide, tissue, spec)
    _check_grid_invariants(slide, grid, spec)
    assert grid.target_downsample == pytest.approx(target_ds, rel=0.03)
    assert grid.target_mpp == pytest.approx(slide_mpp * grid.target_downsample)
    # Completeness: every grid position that passes the filter is present.
    ps0, step0 = grid.patch_size_level0, grid.step_level0
    n = expected_tile_count(w0, h0, ps0, step0)
    assert len(grid) <= n
    if 0 < n <= 200:
        kept = set(map(tuple, grid.coords.tolist()))
        for yy in range(0, h0 - ps0 + 1, step0):
            for xx in range(0, w0 - ps0 + 1, step0):
                frac = _brute_fraction(mask, ds, xx, yy, ps0) if ps0 <= 512 else None
                if frac is None:
                    continue
                passes = frac > 0 if min_tissue == 0 else frac >= min_tissue
                clear = abs(frac - min_tissue) > 0.02 or (min_tissue == 0 and frac > 0.02)
                if clear or frac == 0:
                    assert ((xx, yy) in kept) == passes
