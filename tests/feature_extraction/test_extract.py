"""The extraction pipeline on real slide files: batches that never stop, resume, shards, locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.feature_extraction.batch import (
    discover_slides,
    effective_shard,
    parse_shard,
    read_manifest,
    select_shard,
)
from milkit.feature_extraction.extract import ExtractConfig, preprocess
from milkit.io.atomic import acquire_lock
from milkit.io.bags import is_complete_bag, read_bag, write_bag

REPO = Path(__file__).resolve().parents[2]
FIXTURES = [
    "CMU-1-Small-Region.svs",
    "broken.svs",
    "synthetic/small.svs",
    "synthetic/unreadable.svs",
    "synthetic/unopenable.tiff",
    "synthetic/boxes.tiff",
    "synthetic/boxes_0.dcm",
]
FAST = dict(encoder="fast", num_workers=0, progress=False)
TRIDENT_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
)
CLAM_ATTRS = ("patch_level", "downsample", "level_dim", "downsampled_level_dim")
OUR_ATTRS = ("mpp_level0", "target_mpp", "custom_downsample", "coords_frame")


@pytest.fixture(scope="module")
def fixture_run(slides_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bags")
    summary = preprocess([slides_dir / f for f in FIXTURES], out, ExtractConfig(**FAST))
    return summary, out


def test_batch_over_fixtures_never_stops(fixture_run):
    summary, out = fixture_run
    status = {r.slide_id: r for r in summary.results}
    assert {k: r.status for k, r in status.items()} == {
        "CMU-1-Small-Region": "ok",
        "broken": "failed",
        "small": "empty",
        "unreadable": "failed",
        "unopenable": "failed",
        "boxes": "failed",
        "boxes_0": "empty",
    }
    assert summary.exit_code == 1
    assert "cannot open slide" in status["broken"].error
    assert "cannot open slide" in status["unopenable"].error
    assert "tissue segmentation could not read" in status["unreadable"].error
    assert "absurd resolution" in status["boxes"].error and "--slide-mpp" in status["boxes"].error
    text = summary.format()
    assert "1 ok, 2 empty" in text and "4 failed" in text and "FAILED broken" in text
    assert "EMPTY small: smaller than one 256-px tile at 0.5 µm/px" in text
    manifest = read_manifest(out)
    assert set(manifest) == set(status)
    assert manifest["broken"]["status"] == "failed" and manifest["broken"]["error"]
    assert not any(out.glob("*.lock")) and not any(out.glob("*.partial"))
    assert sorted(p.name for p in out.glob("*.h5")) == [
        "CMU-1-Small-Region.h5",
        "boxes_0.h5",
        "small.h5",
    ]
    assert (out / "qc" / "CMU-1-Small-Region.png").stat().st_size > 1000


def test_cmu_bag_contents(fixture_run, slides_dir):
    _, out = fixture_run
    bag = read_bag(out / "CMU-1-Small-Region.h5")
    n = bag.num_instances
    # 2220 x 2967 px at 0.499 µm/px, 256-px tiles: 8 x 11 = 88 grid positions, ~35 % tissue.
    assert 15 <= n <= 70
    assert bag.features.shape == (n, 218) and bag.features.dtype == np.float32
    assert np.isfinite(bag.features).all()
    c = bag.coords
    assert (c >= 0).all() and (c[:, 0] + 256 <= 2220).all() and (c[:, 1] + 256 <= 2967).all()
    assert (c % 256 == 0).all()  # native 0.499 µm/px read 1:1, no overlap
    order = np.lexsort((c[:, 0], c[:, 1]))
    assert np.array_equal(order, np.arange(n))  # raster order
    for key in TRIDENT_ATTRS + CLAM_ATTRS + OUR_ATTRS:
        assert key in bag.coords_attrs, key
    assert bag.coords_attrs["patch_size"] == 256 and bag.coords_attrs["patch_level"] == 0
    assert bag.features_attrs["encoder"] == "fast" and bag.features_attrs["embed_dim"] == 218
    root = bag.root_attrs
    assert root["slide_id"] == "CMU-1-Small-Region"
    assert root["slide_sha256"].startswith("ed92d5a9f2e86df6")  # README checksum
    assert json.loads(root["tissue_params"])["seg_mpp"] > 0
    assert root["n_bad_tiles"] == 0 and root["milkit_format"] >= 1
    assert root["mpp_source"] == "openslide.mpp-x"


def test_empty_slides_get_valid_zero_row_bags(fixture_run):
    _, out = fixture_run
    for sid in ("small", "boxes_0"):
        bag = read_bag(out / f"{sid}.h5")
        assert bag.features.shape == (0, 218) and bag.coords.shape == (0, 2)
        assert is_complete_bag(out / f"{sid}.h5")


def test_bag_reads_like_clam_and_trident(fixture_run):
    """CLAM (dataset_generic.py) and TRIDENT index datasets by name with plain h5py."""
    _, out = fixture_run
    with h5py.File(out / "CMU-1-Small-Region.h5", "r") as f:
        features = f["features"][:]
        coords = f["coords"][:]
        assert features.dtype == np.float32 and coords.dtype == np.int64
        assert coords.shape == (features.shape[0], 2)
        attrs = f["coords"].attrs
        # TRIDENT "native" coords need these three; its slide encoders need patch_size_level0.
        assert int(attrs["patch_size"]) == 256 and float(attrs["target_magnification"]) > 0
        assert float(attrs["level0_magnification"]) == 20.0
        assert int(attrs["patch_size_level0"]) == 256
        # CLAM's extract_features_fp reads patch_level + patch_size.
        assert int(attrs["patch_level"]) == 0


def test_rerun_skips_complete_bags_and_mpp_csv_rescues(fixture_run, slides_dir, tmp_path):
    _, out = fixture_run
    before = (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nboxes,0.5\n")
    slides = [slides_dir / "CMU-1-Small-Region.svs", slides_dir / "synthetic/boxes.tiff"]
    summary = preprocess(slides, out, ExtractConfig(**FAST, mpp_csv=csv))
    status = {r.slide_id: r.status for r in summary.results}
    assert status == {"CMU-1-Small-Region": "skipped", "boxes": "empty"}  # boxes: no tissue
    assert (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns == before
    assert read_manifest(out)["boxes"]["status"] == "empty"
    assert read_bag(out / "boxes.h5").coords_attrs["mpp_level0"] == 0.5
    assert read_bag(out / "boxes.h5").root_attrs["mpp_source"] == "override"


def test_existing_bag_from_another_encoder_is_not_mixed_in(slides_dir, tmp_path):
    write_bag(
        tmp_path / "small.h5",
        np.zeros((0, 1024), np.float32),
        np.zeros((0, 2), np.int64),
        features_attrs={"encoder": "uni"},
    )
    summary = preprocess([slides_dir / "synthetic/small.svs"], tmp_path, ExtractConfig(**FAST))
    (result,) = summary.results
    assert result.status == "failed" and "encoder 'uni' → 'fast' (--encoder)" in result.error
    assert "--overwrite" in result.error
    summary = preprocess(
        [slides_dir / "synthetic/small.svs"], tmp_path, ExtractConfig(**FAST, overwrite=True)
    )
    assert summary.results[0].status == "empty" and summary.exit_code == 0
    assert read_bag(tmp_path / "small.h5").dim == 218


def test_discovery(slides_dir, tmp_path):
    found = discover_slides([slides_dir])
    names = sorted(p.name for p in found)
    assert "CMU-1-Small-Region.svs" in names and "boxes.tiff" in names
    # The DICOM series counts once; its folder holds other slides, so it is named by its file.
    assert "boxes_0.dcm" in names and "boxes_1.dcm" not in names and "synthetic" not in names
    assert "README.md" not in names
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MilkitError, match="no slides found"):
        discover_slides([tmp_path])
    with pytest.raises(MilkitError, match="slide path not found"):
        discover_slides([tmp_path / "missing.svs"])


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.text("abcxyz0123", min_size=1, max_size=6), min_size=0, max_size=30),
    n=st.integers(1, 7),
    world=st.integers(1, 3),
)
def test_shards_partition_slides(names, n, world):
    slides = [Path(f"/data/{s}.svs") for s in dict.fromkeys(names)]
    seen: list[Path] = []
    for i in range(1, n + 1):
        for rank in range(world):
            index, count = effective_shard((i, n), {"RANK": str(rank), "WORLD_SIZE": str(world)})
            seen += select_shard(list(reversed(slides)), index, count)
    assert sorted(seen) == sorted(slides)  # each slide exactly once, whatever the input order


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(MilkitError, match="shard"):
            parse_shard(bad)


def test_shard_runs_cover_each_slide_once(slides_dir, tmp_path):
    slides = [
        slides_dir / "synthetic/small.svs",
        slides_dir / "synthetic/boxes_0.dcm",
        slides_dir / "broken.svs",
    ]
    done: list[str] = []
    for i in (1, 2):
        summary = preprocess(slides, tmp_path, ExtractConfig(**FAST, shard=(i, 2)))
        done += [r.slide_id for r in summary.results]
    assert sorted(done) == ["boxes_0", "broken", "small"]
    assert set(read_manifest(tmp_path)) == {"boxes_0", "broken", "small"}


def test_live_lock_skips_and_dead_lock_is_cleared(slides_dir, tmp_path):
    small = slides_dir / "synthetic/small.svs"
    lock = tmp_path / "small.h5.lock"
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"pid": helper.pid, "host": os.uname().nodename, "time": 0}))
        summary = preprocess([small], tmp_path, ExtractConfig(**FAST))
        assert summary.skipped_locked == ["small"] and summary.results == []
        assert not (tmp_path / "small.h5").exists() and lock.exists()
        assert not acquire_lock(lock)
    finally:
        helper.kill()
        helper.wait()
    summary = preprocess([small], tmp_path, ExtractConfig(**FAST))  # holder is dead now
    assert [r.status for r in summary.results] == ["empty"] and not lock.exists()


def _corrupt_tile(path: Path, tile_index: int) -> None:
    """Overwrite the JPEG bytes of one level-0 tile (TIFF tile offsets from tifffile)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offset = page.dataoffsets[tile_index]
        count = page.databytecounts[tile_index]
    with path.open("r+b") as fh:
        fh.seek(offset + 2)  # keep SOI, destroy the segments after it
        fh.write(b"\x11" * (count - 2))


@pytest.fixture(scope="module")
def synthetic_slides(tmp_path_factory):
    from milkit.feature_extraction.synthetic import make_synthetic_slide

    d = tmp_path_factory.mktemp("synth")
    out = {}
    for name, seed, regions, size in (("tumour_a", 3, 2, 3072), ("normal_b", 4, 0, 2048)):
        out[name] = make_synthetic_slide(
            d / f"{name}.svs",
            size,
            size,
            mpp=0.5,
            seed=seed,
            tissue_fraction=0.6,
            tumour_regions=regions,
            tumour_fraction=0.4 if regions else 0.0,
        )
    return out


def test_corrupt_tiles_are_counted_and_dropped(synthetic_slides, tmp_path):
    import shutil

    src = synthetic_slides["normal_b"].path
    clean_out, bad_out = tmp_path / "clean", tmp_path / "bad"
    broken = tmp_path / "slides" / src.name
    broken.parent.mkdir()
    shutil.copy(src, broken)
    _corrupt_tile(broken, 2 * 8 + 3)  # tile (x=3, y=2) of the 8 x 8 level-0 grid
    cfg = ExtractConfig(**FAST, min_tissue=0.0)
    preprocess([src], clean_out, cfg)
    summary = preprocess([broken], bad_out, cfg)
    (result,) = summary.results
    clean = read_bag(clean_out / "normal_b.h5")
    bad = read_bag(bad_out / "normal_b.h5")
    assert result.status == "ok" and result.n_bad_tiles >= 1
    assert bad.num_instances == clean.num_instances - result.n_bad_tiles
    dropped = {tuple(c) for c in clean.coords.tolist()} - {tuple(c) for c in bad.coords.tolist()}
    assert (768, 512) in dropped
    assert json.loads(bad.root_attrs["bad_tile_coords"]) == sorted(map(list, dropped))
    keep = np.array([tuple(c) not in dropped for c in clean.coords.tolist()])
    np.testing.assert_array_equal(bad.features, clean.features[keep])
    assert "unreadable tile" in summary.format()


def test_fast_features_separate_tumour_tiles(synthetic_slides, tmp_path):
    from milkit.feature_extraction.synthetic import tumour_fraction_of_tiles

    slide = synthetic_slides["tumour_a"]
    preprocess([slide.path], tmp_path, ExtractConfig(**FAST))
    bag = read_bag(tmp_path / "tumour_a.h5")
    frac = tumour_fraction_of_tiles(slide, bag.coords, 256)
    sel = (frac >= 0.75) | (frac == 0)
    x, y = bag.features[sel].astype(np.float64), (frac[sel] >= 0.75).astype(int)
    assert y.sum() >= 10 and (1 - y).sum() >= 10
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[: len(y) // 2], idx[len(y) // 2 :]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(a[tr].T @ a[tr] + 10.0 * np.eye(a.shape[1]), a[tr].T @ (2.0 * y[tr] - 1))
    assert ((a[te] @ w > 0) == y[te]).mean() >= 0.9


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import milkit.feature_extraction.encoders.registry as reg
    from milkit.feature_extraction.extract import ExtractConfig, preprocess

    calls = {"n": 0}
    original = reg.PatchEncoder.encode

    def encode(self, tiles):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-slide, no cleanup
        return original(self, tiles)

    reg.PatchEncoder.encode = encode
    slides = sys.argv[1].split(",")
    preprocess(slides, sys.argv[2], ExtractConfig(encoder="fast", num_workers=1,
               batch_size=4, progress=False))
    """
)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bags(tmp_path):
    from milkit.feature_extraction.synthetic import make_synthetic_slide

    slides = [
        make_synthetic_slide(tmp_path / f"{name}.svs", 1024, 1024, seed=i, tissue_fraction=0.8).path
        for i, name in enumerate(("k_b", "k_a"))
    ]
    ordered = sorted(slides, key=lambda p: p.stem)  # processing order: k_a, k_b
    cfg = ExtractConfig(encoder="fast", num_workers=1, batch_size=4, progress=False)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    preprocess(slides, ref_dir, cfg)
    n_first = read_bag(ref_dir / f"{ordered[0].stem}.h5").num_instances
    n_second = read_bag(ref_dir / f"{ordered[1].stem}.h5").num_instances
    assert n_first >= 1 and n_second > 4
    kill_at = -(-n_first // 4) + 2  # the 2nd batch of the second slide
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"
    args = [sys.executable, "-c", _KILL_SCRIPT, ",".join(map(str, slides)), str(run_dir)]
    with log.open("wb") as fh:  # a file, not a pipe: orphaned readers may outlive the kill
        proc = subprocess.run(
            [*args, str(kill_at)], env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=120
        )
    assert proc.returncode == -9, log.read_text()[-2000:]
    assert is_complete_bag(run_dir / f"{ordered[0].stem}.h5")
    assert not is_complete_bag(run_dir / f"{ordered[1].stem}.h5")
    assert (run_dir / f"{ordered[1].stem}.h5.lock").exists()  # left by the killed process
    summary = preprocess(slides, run_dir, cfg)
    status = {r.slide_id: r.status for r in summary.results}
    assert status == {ordered[0].stem: "skipped", ordered[1].stem: "ok"}
    for p in slides:
        a, b = read_bag(ref_dir / f"{p.stem}.h5"), read_bag(run_dir / f"{p.stem}.h5")
        assert a.features.tobytes() == b.features.tobytes()  # bitwise
        np.testing.assert_array_equal(a.coords, b.coords)


@pytest.mark.slow
def test_resnet50_trunc_run_with_local_checkpoint(tmp_path):
    import torch

    from milkit.feature_extraction.encoders.registry import file_sha256
    from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone
    from milkit.feature_extraction.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "tiny.svs", 512, 512, mpp=0.5, tissue_fraction=0.9)
    weights = tmp_path / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(build_resnet50_backbone().state_dict(), weights)
    cfg = ExtractConfig(
        encoder="resnet50-trunc", weights=weights, num_workers=0, batch_size=4, progress=False
    )
    summary = preprocess([slide.path], tmp_path / "out", cfg)
    (result,) = summary.results
    assert result.status == "ok" and result.n_tiles >= 1, result.error
    bag = read_bag(tmp_path / "out" / "tiny.h5")
    assert bag.features.shape == (result.n_tiles, 1024) and np.isfinite(bag.features).all()
    assert bag.features_attrs["encoder_weights_sha256"] == file_sha256(weights)
    # Declared fp32 ("as CLAM"): --precision auto keeps it fp32, native bf16 or not.
    assert bag.features_attrs["precision"] == "fp32"


def _strip_tiff(path: Path, width: int, height: int, bands: list[tuple[int, int, int, int]]):
    """A plain strip TIFF at 0.5 µm/px: near-white glass with pink 'tissue' boxes (x0, y0, x1, y1)."""
    import tifffile

    rng = np.random.default_rng(0)
    img = (240 + rng.integers(0, 8, (height, width, 3))).astype(np.uint8)
    for x0, y0, x1, y1 in bands:
        shape = (y1 - y0, x1 - x0)
        img[y0:y1, x0:x1] = np.stack(
            [
                rng.integers(150, 200, shape),
                rng.integers(60, 110, shape),
                rng.integers(140, 190, shape),
            ],
            axis=-1,
        ).astype(np.uint8)
    tifffile.imwrite(
        path, img, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    return path


def test_slides_without_tiles_are_empty_with_a_reason(slides_dir, tmp_path):
    """16x16 slide, bare glass, a speck of tissue: status empty, reason, 0-row bag, exit 0."""
    glass = _strip_tiff(tmp_path / "glass.tif", 1024, 1024, [])
    # A 45-µm band of tissue along a tile boundary: each tile holds < 25 % of tissue.
    speck = _strip_tiff(tmp_path / "speck.tif", 2048, 768, [(400, 211, 1800, 301)])
    slides = [slides_dir / "synthetic/small.svs", glass, speck]
    out = tmp_path / "bags"
    summary = preprocess(slides, out, ExtractConfig(**FAST))
    by_id = {r.slide_id: r for r in summary.results}
    assert {k: r.status for k, r in by_id.items()} == dict.fromkeys(
        ("small", "glass", "speck"), "empty"
    )
    assert summary.exit_code == 0 and summary.count("ok") == 0
    assert by_id["small"].reason.startswith("smaller than one 256-px tile at 0.5 µm/px")
    assert by_id["glass"].reason.startswith("no tissue found")
    assert by_id["speck"].reason.startswith("no tissue at min-tissue 0.25")
    assert "the best tile holds 1" in by_id["speck"].reason  # 10–19 %
    text = summary.format()
    assert "0 ok, 3 empty (no tiles)" in text
    assert "EMPTY speck: no tissue at min-tissue 0.25" in text
    manifest = read_manifest(out)
    for sid, r in by_id.items():
        assert manifest[sid]["status"] == "empty" and manifest[sid]["reason"] == r.reason
        bag = read_bag(out / f"{sid}.h5")  # still a valid 0-row bag, with the reason inside
        assert bag.features.shape == (0, 218) and bag.coords.shape == (0, 2)
        assert bag.root_attrs["status"] == "empty" and bag.root_attrs["reason"] == r.reason
    # With a lower min-tissue the speck is tiled: a changed recipe is refused, not mixed in ...
    summary = preprocess([speck], out, ExtractConfig(**FAST, min_tissue=0.1))
    assert (
        summary.results[0].status == "failed"
        and "min_tissue 0.25 → 0.1" in summary.results[0].error
    )
    # ... and in a fresh folder it gives tiles.
    summary = preprocess([speck], tmp_path / "low", ExtractConfig(**FAST, min_tissue=0.1))
    assert summary.results[0].status == "ok" and summary.results[0].n_tiles >= 4
    # A rerun skips empty slides like finished ones, and says what they hold.
    summary = preprocess(slides, out, ExtractConfig(**FAST))
    assert [r.status for r in summary.results] == ["skipped"] * 3
    assert "3 skipped (already done with the same settings: 0 ok, 3 empty)" in summary.format()
    assert read_manifest(out)["speck"]["status"] == "empty"


def test_slide_whose_tiles_are_all_unreadable_fails(synthetic_slides, tmp_path):
    import shutil

    src = synthetic_slides["normal_b"].path
    broken = tmp_path / "slides" / src.name
    broken.parent.mkdir()
    shutil.copy(src, broken)
    for i in range(64):  # every tile of the 8 x 8 level-0 grid; level 1 (segmentation) is intact
        _corrupt_tile(broken, i)
    summary = preprocess([broken], tmp_path / "bags", ExtractConfig(**FAST))
    (result,) = summary.results
    assert result.status == "failed" and "tiles of the slide were unreadable" in result.error
    assert not (tmp_path / "bags" / "normal_b.h5").exists()
