"""The bag file contract (docs/architecture.md §4): layout, raster order, atomicity, CLAM/TRIDENT readers."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from milkit.errors import MilkitError
from milkit.io.bags import (
    find_bag,
    is_complete_bag,
    list_bags,
    read_bag,
    read_bag_header,
    write_bag,
)


def _coords(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(8) * 256, np.arange(8) * 256), -1).reshape(-1, 2)
    return grid[rng.permutation(len(grid))[:n]]


def test_written_bag_reads_like_clam_and_trident(tmp_path):
    coords = _coords(20)
    feats = np.random.default_rng(1).normal(size=(20, 7)).astype(np.float32)
    path = write_bag(
        tmp_path / "s1.h5",
        feats,
        coords,
        coords_attrs={"patch_size": 224, "patch_level": 0, "level0_magnification": 20},
        features_attrs={"encoder": "fast"},
        root_attrs={"slide_path": "/x/s1.svs", "tissue": {"preset": "default"}},
    )
    with h5py.File(path, "r") as f:  # the way CLAM's and TRIDENT's loaders read bags
        f_features = f["features"][:]
        f_coords = f["coords"][:]
        assert f_features.dtype == np.float32 and f_coords.dtype == np.int64
        assert f["coords"].attrs["patch_size"] == 224
        assert f["coords"].attrs["coords_frame"] == "level0_px_top_left"
        assert f.attrs["milkit_format"] == 1
        assert f.attrs["slide_id"] == "s1"
    # rows were put into raster order (y, then x) and features moved with their coords
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(f_coords, coords[order])
    np.testing.assert_array_equal(f_features, feats[order])
    bag = read_bag(path)
    assert bag.source == "milkit" and bag.num_instances == 20 and bag.dim == 7
    assert bag.root_attrs["tissue"] == '{"preset": "default"}'
    assert is_complete_bag(path)


def test_empty_bag_is_valid(tmp_path):
    path = write_bag(tmp_path / "empty.h5", np.zeros((0, 5), np.float32), np.zeros((0, 2)))
    header = read_bag_header(path)
    assert (header.num_instances, header.dim) == (0, 5)
    assert read_bag(path).features.shape == (0, 5)


def test_float16_bag(tmp_path):
    feats = np.ones((3, 4), np.float32)
    path = write_bag(tmp_path / "h.h5", feats, _coords(3), dtype="float16")
    assert read_bag(path).features.dtype == np.float16


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(MilkitError, match="coords must have shape"):
        write_bag(tmp_path / "bad.h5", np.ones((3, 4)), np.ones((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_partial_and_foreign_files_are_not_complete(tmp_path):
    (tmp_path / "a.h5.partial").write_bytes(b"junk")
    (tmp_path / "b.h5").write_bytes(b"not hdf5")
    assert not is_complete_bag(tmp_path / "a.h5.partial")
    assert not is_complete_bag(tmp_path / "b.h5")
    with pytest.raises(MilkitError, match=r"cannot open bag as HDF5.*b\.h5"):
        read_bag(tmp_path / "b.h5")


def test_reads_trident_and_clam_layouts_and_legacy_pt(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["features"] = np.ones((4, 3), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
        f["coords"].attrs["level0_magnification"] = 40
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["features"] = np.ones((2, 3), np.float32)
        f["coords"] = np.zeros((2, 2), np.int32)
    torch.save(torch.ones(5, 3), tmp_path / "p.pt")
    assert read_bag(tmp_path / "t.h5").source == "trident"
    assert read_bag(tmp_path / "c.h5").source == "clam"
    pt = read_bag(tmp_path / "p.pt")
    assert pt.source == "pt" and pt.coords is None and pt.features.shape == (5, 3)
    assert find_bag(tmp_path, "p") == tmp_path / "p.pt"
    assert set(list_bags(tmp_path)) == {"t", "c", "p"}


def test_coords_only_file_gets_a_clear_error(tmp_path):
    with h5py.File(tmp_path / "patches.h5", "w") as f:
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(MilkitError, match="no 'features' dataset"):
        read_bag(tmp_path / "patches.h5")


# ------------------------------------------------------------------ coords and tile size
def test_bag_patch_size_level0_reads_milkit_then_clam_attrs_then_the_grid(tmp_path):
    from milkit.io.bags import bag_patch_size_level0

    coords = np.array([[0, 0], [512, 0], [0, 1024]])
    assert bag_patch_size_level0({"patch_size_level0": 448}, coords, tmp_path) == 448.0
    clam = {"patch_size": 256, "downsample": [4.0, 4.0]}  # CLAM: size at patch_level
    assert bag_patch_size_level0(clam, coords, tmp_path) == 1024.0
    assert bag_patch_size_level0({"patch_size_level0": "None"}, coords, tmp_path) == 512.0
    with pytest.raises(MilkitError, match="cannot tell the tile size") as info:
        bag_patch_size_level0({}, coords[:1], tmp_path / "one.h5")
    assert "one.h5" in str(info.value)


def test_read_bag_coords_and_the_finite_scan(tmp_path):
    from milkit.io.bags import features_are_finite, read_bag_coords

    feats = np.ones((3, 4), dtype=np.float32)
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    path = write_bag(tmp_path / "s.h5", feats, coords, coords_attrs={"patch_size_level0": 256})
    got, attrs = read_bag_coords(path)
    assert got.dtype == np.int64 and got.tolist() == coords.tolist()
    assert attrs["patch_size_level0"] == 256
    assert features_are_finite(path)
    feats[1, 2] = np.nan
    assert not features_are_finite(write_bag(tmp_path / "n.h5", feats, coords))
    torch.save(torch.ones(2, 4), tmp_path / "p.pt")
    with pytest.raises(MilkitError, match="no tile coordinates"):
        read_bag_coords(tmp_path / "p.pt")
