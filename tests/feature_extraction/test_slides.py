"""Slide reader: real fixtures (CMU-1-Small-Region, broken/unreadable/odd files) and synthetic ones."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from milkit.errors import MilkitError
from milkit.feature_extraction import slides as slides_mod
from milkit.feature_extraction.slides import (
    Slide,
    TileReadError,
    _composite_on_white,
    dicom_series,
    mpp_candidates,
    open_slide,
    read_mpp_csv,
)
from milkit.feature_extraction.synthetic import make_plain_tiff, make_synthetic_slide, render_region


@pytest.fixture(scope="module")
def cmu(slides_dir: Path) -> Path:
    return slides_dir / "CMU-1-Small-Region.svs"


def test_cmu_small_region_metadata_and_pixels(cmu: Path) -> None:
    with open_slide(cmu) as s:
        assert s.slide_id == "CMU-1-Small-Region"
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx(0.499)
        assert s.magnification == pytest.approx(20.0)
        region = s.read_region((1000, 1500), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        assert region.mean() < 230  # tissue, not glass
        thumb = s.thumbnail(400)
        assert max(thumb.shape[:2]) == 400 and thumb.shape[2] == 3
        assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.01)


def test_region_beyond_the_edge_is_white(cmu: Path) -> None:
    with Slide(cmu) as s:
        region = s.read_region((2200, 2950), 0, (40, 40))
        assert (region[20:, :] == 255).all() and (region[:, 20:] == 255).all()


def test_read_region_rejects_bad_level_and_size(cmu: Path) -> None:
    with Slide(cmu) as s:
        with pytest.raises(MilkitError, match="level out of range"):
            s.read_region((0, 0), 3, (4, 4))
        with pytest.raises(MilkitError, match="size must be positive"):
            s.read_region((0, 0), 0, (0, 4))


@pytest.mark.parametrize("name", ["broken.svs", "synthetic/unopenable.tiff", "missing.svs"])
def test_unopenable_files_raise_milkit_error_naming_the_file(slides_dir: Path, name: str) -> None:
    with pytest.raises(MilkitError) as info:
        Slide(slides_dir / name)
    assert str(slides_dir / name) in str(info.value)


def test_unopenable_tiff_reason_mentions_compression(slides_dir: Path) -> None:
    with pytest.raises(MilkitError, match="52479"):
        Slide(slides_dir / "synthetic" / "unopenable.tiff")


def test_tiny_slide_opens(slides_dir: Path) -> None:
    with Slide(slides_dir / "synthetic" / "small.svs") as s:
        assert s.dimensions == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_unreadable_tile_raises_tile_read_error_and_handle_is_reopened(slides_dir: Path) -> None:
    path = slides_dir / "synthetic" / "unreadable.svs"
    with Slide(path) as s:
        before = s._backend.handle
        with pytest.raises(TileReadError) as info:
            s.read_region((0, 0), 0, (16, 16))
        assert isinstance(info.value, MilkitError)
        assert str(path) in str(info.value) and "Bogus marker" in str(info.value)
        assert s._backend.handle is not before  # a fresh OpenSlide handle
        # The new handle answers normally: metadata, an out-of-slide (tile-free) region, and
        # the same clear error (not a crash) for the corrupt tile again.
        assert s.mpp == pytest.approx(0.499)
        assert (s.read_region((100, 100), 0, (4, 4)) == 255).all()
        with pytest.raises(TileReadError):
            s.read_region((0, 0), 0, (8, 8))


def test_absurd_mpp_is_rejected_with_hint_and_override_works(slides_dir: Path) -> None:
    path = slides_dir / "synthetic" / "boxes.tiff"
    with Slide(path) as s:
        assert s.dimensions == (300, 250)  # geometry is still available
        with pytest.raises(MilkitError) as info:
            _ = s.mpp
        message = str(info.value)
        assert "352.78" in message and "--slide-mpp" in message and str(path) in message
        assert "--mpp-csv" in message and "--mpp VALUE" not in message
    with Slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5
        assert s.magnification == pytest.approx(20.0)
        assert s.level_count == 4
        assert s.best_level_for_downsample(4.5) == 2
        assert s.best_level_for_downsample(1.0) == 0
        assert s.read_region((0, 0), 3, (37, 31)).shape == (31, 37, 3)


def test_mpp_override_out_of_range(cmu: Path) -> None:
    with Slide(cmu, mpp=100.0) as s, pytest.raises(MilkitError, match="outside"):
        _ = s.mpp


def test_dicom_file_and_folder(slides_dir: Path) -> None:
    with Slide(slides_dir / "synthetic" / "boxes_0.dcm") as s:
        assert s.vendor == "dicom"
        assert s.slide_id == "boxes_0"
        assert s.dimensions == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)
    with Slide(slides_dir / "synthetic") as s:  # a folder opens through its first .dcm
        assert s.vendor == "dicom" and s.slide_id == "synthetic"


def test_plain_strip_tiff_falls_back_to_tifffile(tmp_path: Path) -> None:
    truth = make_plain_tiff(tmp_path / "plain.tif", 300, 200, mpp=0.25, seed=3)
    with Slide(truth.path) as s:
        assert s.backend == "tifffile"
        assert s.dimensions == (300, 200)
        assert s.mpp == pytest.approx(0.25)
        region = s.read_region((50, 40), 0, (120, 90))
        np.testing.assert_array_equal(region, render_region(truth, 50, 40, 120, 90))
        assert (s.read_region((290, 0), 0, (20, 5))[:, 10:] == 255).all()
    no_res = make_plain_tiff(tmp_path / "nores.tif", 64, 64, mpp=None)
    with Slide(no_res.path) as s, pytest.raises(MilkitError, match="no microns-per-pixel"):
        _ = s.mpp


def test_synthetic_pyramid_levels_and_pickling(tmp_path: Path) -> None:
    truth = make_synthetic_slide(tmp_path / "p.svs", 2048, 1536, mpp=0.25, seed=1)
    with Slide(truth.path) as s:
        assert s.level_dimensions == ((2048, 1536), (512, 384))
        assert s.mpp == pytest.approx(0.25)
        assert s.magnification == pytest.approx(40.0)
        a = s.read_region((512, 512), 1, (64, 64))
        clone = pickle.loads(pickle.dumps(s))
        assert clone._backend is None  # handles never travel between processes
        np.testing.assert_array_equal(clone.read_region((512, 512), 1, (64, 64)), a)
        clone.close()


def test_thumbnail_block_path_matches_direct_path(tmp_path: Path, monkeypatch) -> None:
    truth = make_synthetic_slide(tmp_path / "t.svs", 1500, 1100, seed=2, levels=1)
    with Slide(truth.path) as s:
        direct = s.thumbnail(300).astype(int)
        monkeypatch.setattr(slides_mod, "_THUMB_DIRECT_PIXELS", 1000)
        blocked = s.thumbnail(300).astype(int)
    assert direct.shape == blocked.shape == (220, 300, 3)
    assert np.abs(direct - blocked).mean() < 2.0


def test_read_level_refuses_huge_levels(cmu: Path, monkeypatch) -> None:
    monkeypatch.setattr(slides_mod, "MAX_READ_PIXELS", 1000)
    with Slide(cmu) as s, pytest.raises(MilkitError, match="too large"):
        s.read_level(0)


def test_read_level_reads_everything(slides_dir: Path) -> None:
    with Slide(slides_dir / "synthetic" / "boxes.tiff", mpp=0.5) as s:
        assert s.read_level(1).shape == (125, 150, 3)


def test_composite_on_white() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # transparent → white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque → itself
    rgba[0, 2] = (0, 0, 0, 128)  # half black → mid grey
    out = _composite_on_white(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_read_mpp_csv(tmp_path: Path) -> None:
    good = tmp_path / "mpp.csv"
    good.write_text("slide,mpp\na.svs,0.25\nb,0.5\n")
    assert read_mpp_csv(good) == {"a.svs": 0.25, "a": 0.25, "b": 0.5}
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("name,res\na,0.5\n")
    with pytest.raises(MilkitError, match="slide_id"):
        read_mpp_csv(bad_header)
    bad_value = tmp_path / "v.csv"
    bad_value.write_text("slide_id,mpp\na,0.5\nb,72\n")
    with pytest.raises(MilkitError, match="row 3") as info:
        read_mpp_csv(bad_value)
    assert str(bad_value) in str(info.value)
    with pytest.raises(MilkitError, match="not found"):
        read_mpp_csv(tmp_path / "none.csv")


def test_premultiplied_bgra_composited_on_white() -> None:
    from milkit.feature_extraction.slides import _premultiplied_bgra_on_white

    buf = np.zeros((1, 3, 4), dtype=np.uint8)
    buf[0, 0] = (0, 0, 0, 0)  # transparent → white
    buf[0, 1] = (30, 20, 10, 255)  # opaque B, G, R → R, G, B
    buf[0, 2] = (0, 0, 64, 128)  # half-transparent premultiplied red over white
    out = _premultiplied_bgra_on_white(buf)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == [64 + 127, 127, 127]


def test_fast_and_public_openslide_paths_agree(slides_dir: Path, monkeypatch) -> None:
    with Slide(slides_dir / "synthetic" / "boxes.tiff", mpp=0.5) as s:
        cases = [((100, 100), 0, (200, 150)), ((0, 0), 1, (150, 125)), ((280, 240), 0, (40, 30))]
        fast = [s.read_region(*c) for c in cases]
        monkeypatch.setattr(slides_mod, "_FAST_ARGB", False)
        slow = [s.read_region(*c) for c in cases]
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_direct_jpeg_level_reads_equal_openslide(tmp_path: Path, monkeypatch) -> None:
    truth = make_synthetic_slide(tmp_path / "d.svs", 1536, 1280, seed=9, tumour_regions=1, levels=2)
    with Slide(truth.path) as s:
        direct = [s._whole_level(level) for level in range(s.level_count)]
        assert s._backend._direct._verified == {0: True, 1: True}  # fast path taken
        monkeypatch.setattr(slides_mod, "_DIRECT_LEVEL_READS", False)
        reference = [s._whole_level(level) for level in range(s.level_count)]
    for a, b in zip(direct, reference):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b).max() <= 2


def test_direct_reads_fall_back_when_colours_differ(cmu: Path, monkeypatch) -> None:
    # CMU-1-Small-Region stores RGB-coded JPEG tiles, which libjpeg would decode as YCbCr:
    # the per-level self-check must reject the fast path and OpenSlide's pixels come back.
    with Slide(cmu) as s:
        fast = s.thumbnail(500)
        assert s._backend._direct._verified == {0: False}
        monkeypatch.setattr(slides_mod, "_DIRECT_LEVEL_READS", False)
        np.testing.assert_array_equal(fast, s.thumbnail(500))


def test_corrupt_tile_in_whole_level_read_is_a_tile_read_error(slides_dir: Path) -> None:
    with (
        Slide(slides_dir / "synthetic" / "unreadable.svs") as s,
        pytest.raises(TileReadError),
    ):
        s.thumbnail(8)


_PIXELS = np.full((64, 64, 3), 230, np.uint8)
_APERIO = "Aperio Image Library v12.0.15\r\n64x64 (240x240) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990"


@pytest.mark.parametrize(
    ("name", "kwargs", "backend", "mpp"),
    [
        ("cm.tif", {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}, "tifffile", 0.5),
        ("inch.tif", {"resolution": (50800, 50800), "resolutionunit": "INCH"}, "tifffile", 0.5),
        (
            "tiled_cm.tif",
            {"tile": (16, 16), "resolution": (4e4, 4e4), "resolutionunit": "CENTIMETER"},
            "openslide",
            0.25,
        ),
        (
            "tiled_inch.tif",
            {"tile": (16, 16), "resolution": (50800, 50800), "resolutionunit": "INCH"},
            "openslide",
            0.5,
        ),
        ("um.ome.tif", {"metadata": {"axes": "YXS", "PhysicalSizeX": 0.25}}, "tifffile", 0.25),
        (
            "nm.ome.tif",
            {"metadata": {"axes": "YXS", "PhysicalSizeX": 242.0, "PhysicalSizeXUnit": "nm"}},
            "tifffile",
            0.242,
        ),
        (
            "tiled.ome.tif",
            {"tile": (16, 16), "metadata": {"axes": "YXS", "PhysicalSizeX": 0.25}},
            "openslide",
            0.25,
        ),
        ("aperio.tif", {"description": _APERIO, "metadata": None}, "tifffile", 0.499),
    ],
)
def test_mpp_read_from_every_tiff_form(tmp_path: Path, name, kwargs, backend, mpp) -> None:
    """TIFF resolution tags (cm, inch), OME-XML PhysicalSizeX with units, Aperio descriptions."""
    import tifffile

    path = tmp_path / name
    tifffile.imwrite(path, _PIXELS, photometric="rgb", **kwargs)
    with Slide(path) as s:
        assert s.backend == backend
        assert s.mpp == pytest.approx(mpp)


@pytest.mark.parametrize(
    ("properties", "mpp"),
    [
        ({"philips.DICOM_PIXEL_SPACING": '"0.000243" "0.000242"'}, 0.242),
        ({"ventana.ScanRes": "0.4649"}, 0.4649),
        ({"hamamatsu.XResolution": "43783"}, 1e4 / 43783),
        ({"openslide.mirax.MPP": "0.2428"}, 0.2428),
        (
            {
                "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]": ".000499",
                "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]": ".000498",
            },
            0.498,
        ),
        (
            {
                "dicom.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]": "0.00025"
            },
            0.25,
        ),
        ({"dicom.PixelSpacing": "0.00025\\0.00025"}, 0.25),
        ({"tiff.ImageDescription": _APERIO}, 0.499),
        # OpenSlide's own value wins over a bogus 72-dpi TIFF tag.
        (
            {"openslide.mpp-x": "0.2527", "tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"},
            0.2527,
        ),
    ],
)
def test_mpp_from_vendor_and_dicom_keys(properties, mpp) -> None:
    _key, value = mpp_candidates(properties)[0]
    assert value == pytest.approx(mpp)
    path = Path("x.svs")
    assert slides_mod.resolve_mpp(properties, override=None, slide_name="x", path=path) == (
        pytest.approx(mpp)
    )


def test_ome_unit_unknown_or_missing_size_is_not_guessed() -> None:
    ome = '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels '
    assert (
        mpp_candidates(
            {
                "tiff.ImageDescription": ome
                + 'PhysicalSizeX="3" PhysicalSizeXUnit="parsec"/></Image></OME>'
            }
        )
        == []
    )
    assert mpp_candidates({"tiff.ImageDescription": ome + "/></Image></OME>"}) == []
    assert mpp_candidates({"tiff.ImageDescription": "<OME broken"}) == []


def _second_series(src: Path, dst: Path) -> None:
    """Copy a DICOM instance with its SeriesInstanceUID changed (same length, one digit)."""
    data = src.read_bytes()
    uid = b"1.3.6.1.4.1.5962.99.1.1747645553.419656796.1689669825649.4.0"
    assert data.count(uid) == 1
    dst.write_bytes(data.replace(uid, uid[:-1] + b"7"))


def test_dicom_folder_with_several_series(slides_dir: Path, tmp_path: Path) -> None:
    import shutil

    from milkit.feature_extraction.batch import discover_slides, slide_id_of

    src = slides_dir / "synthetic"
    one = tmp_path / "one_series"
    one.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(src / name, one / name)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(src / "boxes_0.dcm", mixed / "a_0.dcm")
    shutil.copy(src / "boxes_1.dcm", mixed / "a_1.dcm")
    _second_series(src / "boxes_0.dcm", mixed / "b_0.dcm")
    _second_series(src / "boxes_1.dcm", mixed / "b_1.dcm")
    assert [len(v) for v in dicom_series(mixed).values()] == [2, 2]
    with pytest.raises(MilkitError, match="folder holds 2 DICOM series") as info:
        Slide(mixed)
    assert "a_0.dcm, b_0.dcm" in str(info.value)
    ids = sorted(slide_id_of(p) for p in discover_slides([tmp_path]))
    # A folder that is one series keeps its name; a folder of several is named per series.
    assert ids == ["a_0", "b_0", "one_series"]
    for p in discover_slides([mixed]):
        with Slide(p) as s:
            assert s.vendor == "dicom" and s.dimensions == (16, 16)
    # The shared fixture folder holds one series *and* other slides: named after the file.
    found = {slide_id_of(p): p for p in discover_slides([src])}
    assert "synthetic" not in found and found["boxes_0"].name == "boxes_0.dcm"
