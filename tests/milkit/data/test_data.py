"""Labels validation, bag datasets, collate padding, class balancing (milkit.data.datasets)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from milkit.data.collate import collate_bags
from milkit.data.datasets import BagDataset, InMemoryBagDataset
from milkit.data.labels import load_labels
from milkit.data.sampling import balanced_sampler, class_weights
from milkit.errors import MilkitError
from milkit.io.bags import write_bag


def _grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], axis=1)


def _bag(path: Path, n: int = 5, dim: int = 8, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    write_bag(path, feats, _grid(n), dtype=dtype)
    return feats


def _csv(path: Path, rows: list[str], header: str = "slide_id,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    bags = tmp_path / "bags"
    for i in range(6):
        _bag(bags / f"s{i}.h5", n=3 + i, seed=i)
    rows = [f"s{i},{'tumor' if i % 2 else 'normal'},p{i // 2}" for i in range(6)]
    csv = _csv(tmp_path / "labels.csv", rows, "slide_id,label,case_id")
    return csv, bags


def test_load_labels_builds_table(cohort: tuple[Path, Path]) -> None:
    csv, bags = cohort
    table = load_labels(csv, bags)
    assert table.class_names == ["normal", "tumor"]
    assert table.in_dim == 8
    assert table.frame["slide_id"].tolist() == [f"s{i}" for i in range(6)]
    assert table.frame["label_idx"].tolist() == [0, 1, 0, 1, 0, 1]
    assert table.frame["case_id"].tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert Path(table.frame["bag_path"][3]) == bags / "s3.h5"
    assert "split" not in table.frame.columns


def test_case_id_defaults_to_slide_id_and_split_normalised(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    _bag(bags / "a.h5")
    _bag(bags / "b.h5")
    csv = _csv(tmp_path / "l.csv", ["a,0,Train", "b,1,validation"], "slide_id,label,split")
    table = load_labels(csv, bags)
    assert table.frame["case_id"].tolist() == ["a", "b"]
    assert table.frame["split"].tolist() == ["train", "val"]
    assert table.class_names == ["0", "1"]


def test_every_problem_reported_in_one_error(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    _bag(bags / "ok1.h5")
    _bag(bags / "ok2.h5")
    _bag(bags / "wide.h5", dim=16)
    write_bag(bags / "empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    bad = np.ones((4, 8), np.float32)
    bad[2, 3] = np.nan
    write_bag(bags / "nan.h5", bad, _grid(4))
    inf = np.ones((4, 8), np.float32)
    inf[0, 0] = np.inf
    write_bag(bags / "inf.h5", inf, _grid(4))
    rows = ["ok1,a", "ok2,b", "ok2,a", "ghost,b", "wide,a", "empty,b", "nan,a", "inf,b", "nolab,"]
    csv = _csv(tmp_path / "labels.csv", rows)
    with pytest.raises(MilkitError) as info:
        load_labels(csv, bags)
    msg = str(info.value)
    problems = info.value.problems  # type: ignore[attr-defined]
    assert problems["duplicated slide_id"] == ["ok2"]
    assert problems["missing bag"] == ["ghost", "nolab"]
    assert problems["empty bag (0 instances)"] == ["empty"]
    assert sorted(problems["NaN/inf features"]) == ["inf", "nan"]
    assert problems["missing label"] == ["nolab"]
    assert problems["feature dim differs from the majority D=8"] == ["wide (D=16)"]
    for name in ("ok2", "ghost", "empty", "nan", "inf", "wide", "nolab"):
        assert name in msg
    assert str(csv) in msg


@pytest.mark.parametrize("sep", [",", "\t", ";"])
def test_spreadsheet_exports(tmp_path: Path, sep: str) -> None:
    bags = tmp_path / "bags"
    _bag(bags / "a.h5")
    _bag(bags / "b.h5")
    text = "\ufeff" + "\n".join(
        sep.join(r) for r in [("slide_id", "label"), ("a", "x"), ("b", "y")]
    )
    (tmp_path / "l.csv").write_text(text + "\n", encoding="utf-8")
    table = load_labels(tmp_path / "l.csv", bags)
    assert table.slide_ids == ["a", "b"] and table.class_names == ["x", "y"]


def test_single_class_and_unknown_labels(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    _bag(bags / "a.h5")
    _bag(bags / "b.h5")
    csv = _csv(tmp_path / "l.csv", ["a,x", "b,x"])
    with pytest.raises(MilkitError, match=r"only one class .*: 'x' on all 2"):
        load_labels(csv, bags)
    # With a known label map (evaluation), one class is fine but foreign labels are not.
    table = load_labels(csv, bags, class_names=["x", "y"])
    assert table.frame["label_idx"].tolist() == [0, 0]
    csv2 = _csv(tmp_path / "l2.csv", ["a,x", "b,z"])
    with pytest.raises(MilkitError, match=r"b \('z'\)"):
        load_labels(csv2, bags, class_names=["x", "y"])


def test_many_problems_are_truncated_with_counts(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    _bag(bags / "a.h5")
    rows = ["a,0"] + [f"m{i},{i % 2}" for i in range(12)]
    with pytest.raises(
        MilkitError, match=r"missing bag \(12\): m0, m1, m2, m3, m4, ... and 7 more"
    ):
        load_labels(_csv(tmp_path / "l.csv", rows), bags)


def test_missing_columns_and_files(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    bags.mkdir()
    with pytest.raises(MilkitError, match="labels CSV not found"):
        load_labels(tmp_path / "nope.csv", bags)
    csv = _csv(tmp_path / "l.csv", ["a,0"], "slide,diagnosis")
    with pytest.raises(MilkitError, match=r"lacks column\(s\) \['slide_id', 'label'\]"):
        load_labels(csv, bags)
    csv = _csv(tmp_path / "l.csv", ["a,0"], "slide_id,label")
    with pytest.raises(MilkitError, match="bags folder not found"):
        load_labels(csv, tmp_path / "nobags")


def test_custom_label_column_and_finite_flag(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    bad = np.ones((3, 4), np.float32)
    bad[1, 1] = np.nan
    write_bag(bags / "a.h5", bad, _grid(3))
    _bag(bags / "b.h5", dim=4)
    csv = _csv(tmp_path / "l.csv", ["a,1", "b,0"], "slide_id,grade")
    table = load_labels(csv, bags, label_column="grade", check_finite=False)
    assert table.frame["label"].tolist() == ["1", "0"]
    with pytest.raises(MilkitError, match="NaN/inf"):
        load_labels(csv, bags, label_column="grade")


def test_bag_dataset_items_and_float16(tmp_path: Path) -> None:
    f32 = _bag(tmp_path / "a.h5", n=7, dim=5, seed=1)
    f16 = _bag(tmp_path / "b.h5", n=3, dim=5, seed=2, dtype="float16")
    ds = BagDataset([tmp_path / "a.h5", tmp_path / "b.h5"], [1, 0])
    assert ds.slide_ids == ["a", "b"] and ds.labels.tolist() == [1, 0]
    item = ds[0]
    assert item["features"].dtype == torch.float32 and item["label"] == 1
    np.testing.assert_array_equal(item["features"].numpy(), f32)
    assert item["coords"].dtype == torch.int64
    np.testing.assert_array_equal(item["coords"].numpy(), _grid(7))
    np.testing.assert_array_equal(
        ds[1]["features"].numpy(), f16.astype(np.float16).astype(np.float32)
    )
    no_coords = BagDataset([tmp_path / "a.h5"], load_coords=False)
    assert no_coords[0]["coords"] is None and no_coords[0]["label"] == -1


def test_bag_dataset_from_table_and_cache(cohort: tuple[Path, Path]) -> None:
    csv, bags = cohort
    table = load_labels(csv, bags)
    ds = BagDataset.from_table(table, ["s3", "s0"], cache=True)
    assert ds.slide_ids == ["s3", "s0"] and ds.labels.tolist() == [1, 0]
    first = ds[0]["features"]
    (bags / "s3.h5").unlink()  # served from the cache now
    assert torch.equal(ds[0]["features"], first)
    with pytest.raises(MilkitError, match="not in the labels table"):
        BagDataset.from_table(table, ["s99"])


def test_missing_bag_file_is_clear_error(tmp_path: Path) -> None:
    ds = BagDataset([tmp_path / "gone.h5"], [0])
    with pytest.raises(MilkitError, match="bag file not found"):
        ds[0]


def test_augmentations_only_in_training_mode(tmp_path: Path) -> None:
    feats = _bag(tmp_path / "a.h5", n=50, dim=6, seed=3)
    ds = BagDataset([tmp_path / "a.h5"], [0], max_instances=10, feature_dropout=0.5, seed=1)
    np.testing.assert_array_equal(ds[0]["features"].numpy(), feats)  # off by default
    ds.train(True)
    item = ds[0]
    assert item["features"].shape == (10, 6) and item["coords"].shape == (10, 2)
    xs = item["coords"][:, 0].numpy()
    assert np.all(np.diff(xs) > 0)  # subsample keeps raster order
    rows = xs // 256
    kept = item["features"].numpy()
    nonzero = kept != 0
    # surviving values are the originals scaled by 1 / (1 - p)
    np.testing.assert_allclose(kept[nonzero], (feats[rows] * 2.0)[nonzero], rtol=1e-6)
    assert 0.2 < (~nonzero).mean() < 0.8
    second = ds[0]
    assert not torch.equal(second["coords"], item["coords"])  # fresh draws each call
    ds.set_epoch(0)
    again = ds[0]
    assert torch.equal(again["coords"], item["coords"])  # reproducible per epoch
    ds.train(False)
    assert ds[0]["features"].shape == (50, 6)


def test_in_memory_dataset(tmp_path: Path) -> None:
    bags = [np.ones((3, 4)), torch.zeros(5, 4, dtype=torch.float64)]
    ds = InMemoryBagDataset(bags, [1, 0], coords=[_grid(3), _grid(5)])
    assert ds.slide_ids == ["bag_0", "bag_1"] and ds.labels.dtype == np.int64
    item = ds[1]
    assert item["features"].dtype == torch.float32 and item["features"].shape == (5, 4)
    assert item["coords"].shape == (5, 2) and item["label"] == 0
    assert InMemoryBagDataset(bags, [0, 1])[0]["coords"] is None
    with pytest.raises(MilkitError, match="one label per bag"):
        InMemoryBagDataset(bags, [0])
    with pytest.raises(MilkitError, match="coords of bag 0"):
        InMemoryBagDataset(bags, [0, 1], coords=[_grid(2), _grid(5)])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6))
def test_collate_pads_and_masks(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    bags = [rng.normal(size=(n, 3)) for n in sizes]
    coords = [_grid(n) + 7 for n in sizes]
    ds = InMemoryBagDataset(bags, [i % 2 for i in range(len(sizes))], coords=coords)
    batch = collate_bags([ds[i] for i in range(len(ds))])
    b, n_max = len(sizes), max(sizes)
    assert batch["features"].shape == (b, n_max, 3)
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [
        i % 2 for i in range(b)
    ]
    assert batch["slide_id"] == ds.slide_ids
    assert batch["coords"].shape == (b, n_max, 2)
    if b == 1:
        assert batch["mask"] is None
        return
    assert batch["mask"].dtype == torch.bool
    for i, n in enumerate(sizes):
        assert batch["mask"][i].sum() == n and batch["mask"][i, :n].all()
        np.testing.assert_allclose(batch["features"][i, :n].numpy(), bags[i], rtol=1e-6)
        assert torch.all(batch["features"][i, n:] == 0)
        assert torch.equal(batch["coords"][i, :n], torch.from_numpy(coords[i]))


def test_collate_without_coords_and_mixed_dims() -> None:
    a = {"features": torch.ones(2, 3), "coords": None, "label": 0, "slide_id": "a"}
    b = {
        "features": torch.ones(4, 3),
        "coords": torch.zeros(4, 2, dtype=torch.int64),
        "label": 1,
        "slide_id": "b",
    }
    assert collate_bags([a, b])["coords"] is None
    c = {"features": torch.ones(4, 5), "coords": None, "label": 1, "slide_id": "c"}
    with pytest.raises(MilkitError, match="different feature dims"):
        collate_bags([a, c])


def test_dataloader_with_workers(cohort: tuple[Path, Path]) -> None:
    csv, bags = cohort
    ds = BagDataset.from_table(load_labels(csv, bags))
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_bags, num_workers=1)
    batches = list(loader)
    assert [b["features"].shape[1] for b in batches] == [5, 8]
    assert batches[1]["mask"].sum(1).tolist() == [6, 7, 8]


def test_balanced_sampler_balances() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    draws = list(balanced_sampler(labels, num_samples=20000, generator=gen))
    counts = Counter(labels[draws].tolist())
    assert abs(counts[0] / 20000 - 0.5) < 0.02
    assert len(list(balanced_sampler(labels))) == 100


def test_class_weights() -> None:
    w = class_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0]))
    # weighted count of each class is equal: the point of the weights
    assert torch.isclose(w[0] * 3, w[1] * 1)
    w3 = class_weights([0, 2, 2], 3)
    assert w3[1] == 0 and torch.isclose(w3[0], torch.tensor(1.0))
    with pytest.raises(MilkitError, match="class indices"):
        class_weights([0, 3], 2)


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        ({"chunks": (3, 6)}, "<f4"),  # several chunks, last one partial: fast path
        ({}, "<f4"),  # contiguous: fast path
        ({"chunks": (4, 6), "compression": "gzip"}, "<f4"),  # filtered: HDF5 fallback
        ({"chunks": (4, 2)}, "<f4"),  # column-split chunks: fallback
        ({"chunks": (5, 6)}, ">f4"),  # big-endian: fallback
        ({"chunks": (5, 6)}, "<f8"),  # float64 converted
        ({"chunks": (5, 6)}, "<f2"),  # float16 converted
    ],
)
def test_fast_reader_matches_hdf5(tmp_path: Path, layout: dict, dtype: str) -> None:
    """Foreign (CLAM/TRIDENT-style) layouts read back exactly, fast path or not."""
    import h5py

    feats = np.random.default_rng(1).normal(size=(11, 6)).astype(dtype)
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, **layout)
        f.create_dataset("coords", data=_grid(11))
    item = BagDataset([path], [0])[0]
    assert item["features"].dtype == torch.float32
    np.testing.assert_array_equal(item["features"].numpy(), feats.astype(np.float32))
    np.testing.assert_array_equal(item["coords"].numpy(), _grid(11))


def test_fast_reader_is_used_for_milkit_bags(tmp_path: Path) -> None:
    import h5py

    from milkit.io.bags import _raw_plan

    _bag(tmp_path / "a.h5", n=3000, dim=256)  # 2 MiB chunks -> 2 chunks
    with h5py.File(tmp_path / "a.h5", "r") as f:
        plan = _raw_plan(f["features"])
    assert plan is not None and [p[:2] for p in plan] == [(0, 2048), (2048, 3000)]


def test_float16_bag_is_widened_exactly(tmp_path: Path) -> None:
    feats = _bag(tmp_path / "h.h5", n=3001, dim=200, seed=4, dtype="float16")  # 600k values
    out = BagDataset([tmp_path / "h.h5"])[0]["features"].numpy()
    np.testing.assert_array_equal(out, feats.astype(np.float16).astype(np.float32))


def test_worker_augmentations_reproducible_and_fresh_per_epoch(tmp_path: Path) -> None:
    _bag(tmp_path / "a.h5", n=40, dim=3, seed=7)
    ds = BagDataset([tmp_path / "a.h5"] * 2, [0, 1], max_instances=5).train(True)

    def epoch_draws(seed: int, epochs: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=2, collate_fn=collate_bags, num_workers=1,
                            generator=gen)  # fmt: skip
        return [next(iter(loader))["coords"][:, :, 0].flatten().tolist() for _ in range(epochs)]

    first, again = epoch_draws(0, 2), epoch_draws(0, 2)
    assert first == again  # same torch seed -> same subsamples
    assert first[0] != first[1]  # a new epoch draws new subsamples


def test_legacy_pt_bags(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    bags.mkdir()
    feats = torch.randn(6, 8)
    torch.save(feats, bags / "old.pt")
    _bag(bags / "new.h5")
    bad = feats.clone()
    bad[0, 0] = float("inf")
    torch.save(bad, bags / "bad.pt")
    csv = _csv(tmp_path / "l.csv", ["old,a", "new,b"])
    table = load_labels(csv, bags)
    item = BagDataset.from_table(table)[0]
    assert item["slide_id"] == "old" and item["coords"] is None
    assert torch.equal(item["features"], feats)
    with pytest.raises(MilkitError, match=r"NaN/inf features \(1\): bad"):
        load_labels(_csv(tmp_path / "l2.csv", ["old,a", "bad,b"]), bags)
