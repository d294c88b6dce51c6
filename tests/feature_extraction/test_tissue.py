"""Tissue segmentation: real H&E, synthetic ground truth, and the morphology rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import make_synthetic_slide
from milkit.feature_extraction.tissue import (
    PRESETS,
    TissueParams,
    clean_mask,
    get_preset,
    segment_rgb,
    segment_tissue,
)

PINK = (220, 120, 180)
GLASS = (242, 242, 242)


def test_cmu_small_region_segments_sensibly(slides_dir: Path) -> None:
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        tm = segment_tissue(s)
    # README: ~35% of a thumbnail has saturation > 20; CLAM's default area filter finds nothing.
    assert 0.25 < tm.tissue_fraction < 0.45
    assert tm.mpp == pytest.approx(8.0, rel=0.05)
    h, w = tm.mask.shape
    assert w * tm.downsample[0] == pytest.approx(2220) and h * tm.downsample[1] == pytest.approx(
        2967
    )
    assert tm.threshold >= tm.params.otsu_floor
    assert 0.3 < tm.tissue_area_mm2 < 0.8  # slide is 1.1 x 1.5 mm


@pytest.fixture(scope="module")
def cmu_view(slides_dir: Path) -> tuple[np.ndarray, float]:
    """The CMU slide's 8 µm/px overview (decoded once for the preset tests)."""
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        view = s.thumbnail(round(2967 * 0.499 / 8.0))
    return view, 2967 * 0.499 / view.shape[0]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_find_tissue_on_real_slide(cmu_view: tuple[np.ndarray, float], preset: str) -> None:
    view, mpp = cmu_view
    mask, _ = segment_rgb(view, mpp, PRESETS[preset])
    assert 0.2 < mask.mean() < 0.6


def test_synthetic_slide_matches_ground_truth(tmp_path: Path) -> None:
    truth = make_synthetic_slide(tmp_path / "s.svs", 6000, 4000, seed=11, tumour_regions=1)
    with Slide(truth.path) as s:
        tm = segment_tissue(s)
    # Compare on the ground-truth grid (16 level-0 px per cell).
    d = truth.mask_downsample
    gh, gw = truth.tissue_mask.shape
    rows = np.minimum(((np.arange(gh) + 0.5) * d / tm.downsample[1]).astype(int), tm.shape[0] - 1)
    cols = np.minimum(((np.arange(gw) + 0.5) * d / tm.downsample[0]).astype(int), tm.shape[1] - 1)
    pred = tm.mask[np.ix_(rows, cols)]
    gt = truth.tissue_mask
    iou = (pred & gt).sum() / (pred | gt).sum()
    assert iou > 0.95


def _canvas(h: int = 200, w: int = 200) -> np.ndarray:
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = GLASS
    return img


def test_blank_and_black_images_give_no_tissue() -> None:
    assert not segment_rgb(_canvas(), 8.0)[0].any()
    noisy = _canvas().astype(np.int16) + np.random.default_rng(0).integers(-3, 4, (200, 200, 3))
    assert not segment_rgb(noisy.clip(0, 255).astype(np.uint8), 8.0)[0].any()
    black = np.zeros((100, 100, 3), dtype=np.uint8)
    black[:, :50] = (20, 0, 0)  # dark (V = 20 < black_value) but "saturated" border
    assert not segment_rgb(black, 8.0)[0].any()


def test_small_objects_removed_by_physical_area() -> None:
    img = _canvas()
    img[40:160, 40:160] = PINK  # 120 px side at 8 µm = 0.92 mm²
    img[10:16, 180:186] = PINK  # 6 px side = 2304 µm²
    params = TissueParams(median_um=0, closing_um=0, min_object_um2=5_000)
    mask, _ = segment_rgb(img, 8.0, params)
    assert mask[100, 100] and not mask[12, 182]
    kept, _ = segment_rgb(img, 8.0, TissueParams(median_um=0, closing_um=0, min_object_um2=1_000))
    assert kept[12, 182]
    # Same picture at 1 µm/px: the speck is only 36 µm², removed even by a small limit.
    tiny, _ = segment_rgb(img, 1.0, TissueParams(median_um=0, closing_um=0, min_object_um2=100))
    assert not tiny[12, 182] and tiny[100, 100]


def test_small_holes_filled_large_holes_and_border_glass_kept() -> None:
    img = _canvas()
    img[20:180, 20:180] = PINK
    img[50:54, 50:54] = GLASS  # 16 px² hole = 1024 µm²
    img[90:150, 90:150] = GLASS  # 3600 px² = 230,400 µm²
    params = TissueParams(median_um=0, closing_um=0, max_hole_um2=20_000, min_object_um2=0)
    mask, _ = segment_rgb(img, 8.0, params)
    assert mask[51, 51]  # small hole filled
    assert not mask[120, 120]  # large hole stays background
    assert not mask[5, 5]  # glass touching the border is never a hole


def test_params_validation_json_and_presets() -> None:
    p = TissueParams(saturation_threshold=20)
    assert TissueParams.from_json(p.to_json()) == p
    assert '"saturation_threshold": 20' in p.to_json()
    with pytest.raises(MilkitError, match="saturation_threshold"):
        TissueParams(saturation_threshold="mean")
    with pytest.raises(MilkitError, match="saturation_threshold"):
        TissueParams(saturation_threshold=300)
    with pytest.raises(MilkitError, match="seg_mpp"):
        TissueParams(seg_mpp=0)
    with pytest.raises(MilkitError, match="unknown tissue-segmentation parameter"):
        TissueParams.from_dict({"seg_mpp": 8.0, "bogus": 1})
    assert set(PRESETS) >= {"default", "biopsy", "resection", "permissive"}
    assert get_preset("biopsy").min_object_um2 < get_preset("resection").min_object_um2
    with pytest.raises(MilkitError, match="biopsy"):
        get_preset("nope")


def _clean_reference(mask: np.ndarray, min_px: float, max_hole: float) -> np.ndarray:
    """Slow, obvious reference: connected-component labelling with areas by pixel count."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    kept = keep[labels]
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~kept).view(np.uint8), connectivity=4)
    h, w = kept.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    border = (x == 0) | (y == 0) | (x + stats[:, 2] == w) | (y + stats[:, 3] == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_hole) & ~border
    fill[0] = False
    return kept | fill[labels]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    sigma=st.sampled_from([1.5, 3.0, 6.0]),
    min_px=st.sampled_from([0, 5, 40, 300]),
    max_hole=st.sampled_from([0, 4, 30, 500]),
)
def test_contour_cleaning_equals_connected_components(seed, sigma, min_px, max_hole) -> None:
    import cv2

    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), sigma)
    mask = field > np.quantile(field, rng.uniform(0.3, 0.7))
    np.testing.assert_array_equal(
        clean_mask(mask, min_px, max_hole), _clean_reference(mask, min_px, max_hole)
    )
