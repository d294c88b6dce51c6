"""Marker (pen) ink: removed from the tissue by default, real tissue kept (issue 10, fault 4)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.feature_extraction.extract import ExtractConfig
from milkit.feature_extraction.slides import Slide
from milkit.feature_extraction.synthetic import (
    PEN_RGB,
    SyntheticSlide,
    ink_fraction_of_tiles,
    make_ink_case,
    tissue_fraction_of_tiles,
)
from milkit.feature_extraction.tiling import TileGrid, TileSpec, plan_tiles
from milkit.feature_extraction.tissue import (
    PRESETS,
    TissueMask,
    TissueParams,
    find_pen_ink,
    parse_pen_ink,
    segment_rgb,
    segment_rgb_with_ink,
    segment_tissue,
)

OFF = dataclasses.replace(TissueParams(), pen_ink=())
GLASS = (242, 242, 243)


@pytest.fixture(scope="module")
def ink_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, SyntheticSlide]:
    """The issue's slide (4000² px at 0.5 µm/px, three strokes) and the same slide without ink."""
    root = tmp_path_factory.mktemp("ink")
    return make_ink_case(root / "ink.svs"), make_ink_case(root / "clean.svs", ink=False)


def _tiles(truth: SyntheticSlide, params: TissueParams) -> tuple[TissueMask, TileGrid]:
    with Slide(truth.path) as s:
        tissue = segment_tissue(s, params)
        return tissue, plan_tiles(s, tissue, TileSpec())


def _ink_only(truth: SyntheticSlide, grid: TileGrid) -> int:
    """Tiles holding no tissue at all, but ink."""
    tissue = tissue_fraction_of_tiles(truth, grid.coords, grid.patch_size_level0)
    ink = ink_fraction_of_tiles(truth, grid.coords, grid.patch_size_level0)
    return int(((tissue == 0) & (ink > 0)).sum())


def test_ink_only_tiles_removed_and_tissue_tiles_kept(ink_case) -> None:
    inked, clean = ink_case
    assert inked.ink_mask is not None and clean.ink_mask is None
    np.testing.assert_array_equal(inked.tissue_mask, clean.tissue_mask)  # same tissue
    # The fault: without the filter the strokes are tiled (16 of 107 tiles hold only ink).
    _, before = _tiles(inked, OFF)
    assert _ink_only(inked, before) >= 10
    # With the default parameters: no ink-only tile (≤ 1 %), and exactly the clean slide's tiles.
    tissue, after = _tiles(inked, TissueParams())
    _, reference = _tiles(clean, TissueParams())
    assert _ink_only(inked, after) <= 0.01 * len(after)
    kept = {tuple(c) for c in after.coords.tolist()} & {tuple(c) for c in reference.coords}
    assert len(kept) >= 0.99 * len(reference) and len(after) <= len(reference) + 1
    # The removed ink covers the true strokes and is reported in mm².
    d = inked.mask_downsample
    truth = cv2.resize(
        (inked.ink_mask > 0).view(np.uint8),
        (tissue.mask.shape[1], tissue.mask.shape[0]),
        interpolation=cv2.INTER_NEAREST,
    ).astype(bool)
    assert tissue.ink is not None and (tissue.ink[truth]).mean() > 0.97
    true_mm2 = (inked.ink_mask > 0).sum() * (d * inked.mpp) ** 2 / 1e6
    assert true_mm2 <= tissue.ink_area_mm2 < 1.5 * true_mm2
    assert not (tissue.mask & tissue.ink).any()


def test_filter_changes_nothing_on_the_clean_slide(ink_case) -> None:
    _, clean = ink_case
    on, grid_on = _tiles(clean, TissueParams())
    off, grid_off = _tiles(clean, OFF)
    assert on.ink is None and on.ink_area_mm2 == 0.0
    np.testing.assert_array_equal(on.mask, off.mask)
    np.testing.assert_array_equal(grid_on.coords, grid_off.coords)


def test_real_slide_tissue_coverage_does_not_drop(slides_dir: Path) -> None:
    # CMU-1-Small-Region carries green tissue-marking dye on its margins: specks, not strokes.
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        on, off = segment_tissue(s, TissueParams()), segment_tissue(s, OFF)
        tiles_on, tiles_off = (len(plan_tiles(s, t, TileSpec())) for t in (on, off))
    assert on.tissue_area_mm2 >= 0.999 * off.tissue_area_mm2
    assert tiles_on == tiles_off == 37


def _stroke_image(colour: tuple[int, int, int], width_px: int, rng: np.random.Generator):
    """A 200 × 200 overview at 8 µm/px: pink tissue on the left, a streaky stroke on glass."""
    img = np.empty((200, 200, 3), dtype=np.float32)
    img[:] = GLASS
    img[20:180, 10:80] = (225, 150, 200)
    img[20:180, 10:80] += rng.normal(0, 10, (160, 70, 1))
    stroke = np.zeros((200, 200), dtype=np.uint8)
    cv2.line(stroke, (120, 20), (150, 180), 1, width_px)
    streak = 1 + 0.08 * rng.standard_normal((200, 1, 1)).astype(np.float32)
    factor = np.asarray(colour, np.float32) / np.asarray(GLASS, np.float32) * streak
    img = np.where(stroke[..., None] > 0, img * factor, img)
    return np.clip(img, 0, 255).astype(np.uint8), stroke.astype(bool)


@settings(max_examples=30, deadline=None)
@given(
    colour=st.sampled_from(["blue", "green", "black"]),
    width_um=st.floats(100, 400),
    jitter=st.tuples(*[st.integers(-20, 20)] * 3),
    grey=st.integers(25, 70),
    cast=st.integers(0, 15),
    seed=st.integers(0, 10_000),
)
def test_default_filter_finds_blue_green_black_strokes(
    colour, width_um, jitter, grey, cast, seed
) -> None:
    """Scanned marker colours: blue/green ±20 per channel; black as a dark grey (25–70) with a
    bluish cast of up to 15 (near-neutral, as black markers scan)."""
    if colour == "black":
        rgb = (grey, grey, grey + cast)
    else:
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PEN_RGB[colour], jitter))
    img, stroke = _stroke_image(rgb, max(2, round(width_um / 8)), np.random.default_rng(seed))
    mask, _, ink = segment_rgb_with_ink(img, 8.0)
    assert ink is not None and ink[stroke].mean() > 0.95
    assert not (mask & stroke).any()
    assert mask[30:170, 20:70].mean() > 0.95  # the tissue beside it stays


@settings(max_examples=40, deadline=None)
@given(
    hue=st.one_of(st.floats(245, 359), st.floats(0, 20)),
    sat=st.floats(0.1, 0.9),
    val=st.floats(0.35, 0.95),
    grain=st.floats(10, 30),
    seed=st.integers(0, 10_000),
)
def test_stain_colours_are_never_ink(hue, sat, val, grain, seed) -> None:
    """H&E hues (haematoxylin ≥ 245°, eosin and blood 300–20°), any saturation and brightness
    down to 35 %, textured like tissue (CMU-1-Small-Region's tissue has a local std of value of
    ≥ 9.4 at its 1st percentile, ≥ 12.8 where darker, at 8 µm/px): nothing is removed as ink."""
    rng = np.random.default_rng(seed)
    hsv = np.empty((120, 160, 3), dtype=np.float32)
    hsv[..., 0] = hue
    hsv[..., 1] = sat
    hsv[..., 2] = val
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
    rgb += rng.normal(0, grain, rgb.shape[:2])[..., None]  # nuclei/fibre texture
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    assert find_pen_ink(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), 8.0, TissueParams()) is None


def test_red_ink_is_opt_in_and_small_specks_are_left_alone() -> None:
    img, stroke = _stroke_image(PEN_RGB["red"], 25, np.random.default_rng(0))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    assert find_pen_ink(hsv, 8.0, TissueParams()) is None  # red looks like blood: off by default
    red = find_pen_ink(hsv, 8.0, TissueParams(pen_ink=("red",)))
    assert red is not None and red[stroke].mean() > 0.95
    # A blue dye speck of 8 × 8 px at 8 µm/px = 4096 µm² < pen_min_um2: not ink.
    speck = np.empty((100, 100, 3), dtype=np.uint8)
    speck[:] = GLASS
    speck[40:48, 40:48] = PEN_RGB["blue"]
    assert find_pen_ink(cv2.cvtColor(speck, cv2.COLOR_RGB2HSV), 8.0, TissueParams()) is None
    found = find_pen_ink(cv2.cvtColor(speck, cv2.COLOR_RGB2HSV), 8.0,
                         TissueParams(pen_min_um2=1000, pen_margin_um=0))  # fmt: skip
    assert found is not None and found.sum() == 64


def test_scanner_black_borders_are_not_reported_as_ink() -> None:
    img = np.empty((200, 200, 3), dtype=np.uint8)
    img[:] = GLASS
    img[:, :40] = 3  # out-of-scan area: never tissue (black_value), and not pen ink either
    img[60:140, 80:160] = (225, 150, 200)
    mask, _, ink = segment_rgb_with_ink(img, 8.0)
    assert ink is None and not mask[:, :40].any() and mask[70:130, 90:150].all()


def test_ink_over_tissue_is_cut_out_tissue_on_both_sides_kept() -> None:
    img = np.empty((200, 200, 3), dtype=np.uint8)
    img[:] = GLASS
    img[30:170, 30:170] = (225, 150, 200)
    img[30:170, 90:110] = (img[30:170, 90:110] * (np.array(PEN_RGB["blue"]) / 242)).astype(np.uint8)
    mask, _ = segment_rgb(img, 8.0)
    off, _ = segment_rgb(img, 8.0, OFF)
    assert off[100, 100]  # without the filter the stroke is tissue
    assert not mask[40:160, 92:108].any()
    assert mask[40:160, 35:85].all() and mask[40:160, 115:165].all()


def test_pen_settings_live_in_the_tissue_parameters() -> None:
    assert all(p.pen_ink == ("blue", "green", "black") for p in PRESETS.values())
    p = TissueParams(pen_ink=("green", "blue", "green"))
    assert p.pen_ink == ("blue", "green")  # canonical: equal settings, equal JSON
    record = json.loads(p.to_json())
    assert record["pen_ink"] == ["blue", "green"] and "pen_min_um2" in record
    assert TissueParams.from_json(p.to_json()) == p
    # A record from before the filter existed means "no pen filter", not today's default.
    legacy = {
        k: v for k, v in TissueParams().to_dict().items() if not k.startswith(("pen", "black_ink"))
    }
    assert TissueParams.from_json(json.dumps(legacy)).pen_ink == ()
    assert parse_pen_ink("Red, blue") == ("blue", "red") and parse_pen_ink("none") == ()
    with pytest.raises(MilkitError, match=r"unknown pen ink colour.*purple"):
        parse_pen_ink("blue,purple")
    with pytest.raises(MilkitError, match="unknown pen ink colour"):
        TissueParams(pen_ink=("pink",))


def test_extract_config_and_cli_pass_the_option_into_the_tissue_parameters() -> None:
    from milkit.commands.preprocess import config_from_args, register

    cfg = ExtractConfig(pen_ink=("green", "blue"))
    cfg.validate()
    assert cfg.pen_ink == ("blue", "green") and cfg.tissue().pen_ink == ("blue", "green")
    assert ExtractConfig().tissue().pen_ink == ("blue", "green", "black")
    assert ExtractConfig(tissue_preset="biopsy", pen_ink=()).tissue().pen_ink == ()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def tissue(*flags: str) -> TissueParams:
        return config_from_args(
            parser.parse_args(["preprocess", "s.svs", "--out", "b", *flags])
        ).tissue()

    assert tissue().pen_ink == ("blue", "green", "black")
    assert tissue("--no-pen-filter").pen_ink == ()
    assert tissue("--pen-ink", "none").pen_ink == ()
    assert tissue("--pen-ink", "red,blue").pen_ink == ("blue", "red")
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["preprocess", "s", "--out", "b", "--no-pen-filter", "--pen-ink", "red"])


def test_preprocess_records_the_pen_filter_in_the_bag_and_qc(ink_case, tmp_path: Path) -> None:
    from milkit.feature_extraction.extract import preprocess
    from milkit.io.bags import read_bag_header

    inked, _ = ink_case
    cfg = ExtractConfig(encoder="fast", num_workers=0, progress=False, device="cpu")
    summary = preprocess([inked.path], tmp_path, cfg)
    assert summary.exit_code == 0, summary.format()
    header = read_bag_header(tmp_path / "ink.h5")
    assert header.num_instances == 91
    assert json.loads(header.root_attrs["tissue_params"])["pen_ink"] == ["blue", "green", "black"]
    assert 0.3 < float(header.root_attrs["pen_ink_mm2"]) < 0.5
    assert (tmp_path / "qc" / "ink.png").stat().st_size > 10_000
    # The pen settings are part of the recorded recipe: a rerun without the filter is refused.
    rerun = preprocess([inked.path], tmp_path, dataclasses.replace(cfg, pen_ink=()))
    assert rerun.exit_code == 1 and "--pen-ink" in rerun.results[0].error
