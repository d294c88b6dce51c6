"""MIL benchmark loaders reproduce the README statistics; standardisation; formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.data.collate import collate_bags
from milkit.data.mil_benchmarks import (
    ENV_ROOT,
    Standardizer,
    benchmark_folds,
    fit_standardizer,
    load_mil_benchmark,
)
from milkit.errors import MilkitError


def test_musk1_statistics(mil_benchmarks_dir: Path) -> None:
    b = load_mil_benchmark(mil_benchmarks_dir / "Musk1")
    s = b.stats()
    assert (s["bags"], s["positive"], s["negative"]) == (92, 47, 45)
    assert (s["instances"], s["features"]) == (476, 166)
    assert (s["bag_size_min"], s["bag_size_max"]) == (2, 40)
    assert round(s["bag_size_mean"], 2) == 5.17
    allf = np.concatenate(b.bags)
    assert (allf.min(), allf.max()) == (-348, 336)  # raw integers, README range
    assert np.array_equal(b.bag_ids, np.arange(1, 93))
    # data.csv is D x N: the first feature row of the file is column 0 of every instance
    first_row = np.loadtxt(mil_benchmarks_dir / "Musk1" / "data.csv", delimiter="\t", max_rows=1)
    assert np.array_equal(allf[:, 0], first_row)


def test_musk2_statistics_and_cross_check(mil_benchmarks_dir: Path) -> None:
    b = load_mil_benchmark(mil_benchmarks_dir / "Musk2")
    s = b.stats()
    assert (s["bags"], s["positive"], s["negative"]) == (102, 39, 63)
    assert (s["instances"], s["features"]) == (6598, 166)
    assert (s["bag_size_min"], s["bag_size_max"]) == (1, 1044)
    assert round(s["bag_size_mean"], 2) == 64.69
    allf = np.concatenate(b.bags)
    assert (allf.min(), allf.max()) == (-471, 625)
    # bag sizes and labels agree with the MIProblems bagids/labels files
    ids = np.loadtxt(mil_benchmarks_dir / "Musk2" / "bagids.csv", dtype=np.int64)
    labels = np.loadtxt(mil_benchmarks_dir / "Musk2" / "labels.csv", dtype=np.int64)
    assert np.array_equal(b.bag_sizes, np.bincount(ids)[1:])
    assert np.array_equal(b.labels, np.array([labels[ids == k][0] for k in range(1, 103)]))


def test_lookup_by_name(mil_benchmarks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(load_mil_benchmark("musk1", root=mil_benchmarks_dir)) == 92
    monkeypatch.setenv(ENV_ROOT, str(mil_benchmarks_dir))
    assert load_mil_benchmark("MUSK1").name == "Musk1"
    monkeypatch.delenv(ENV_ROOT)
    with pytest.raises(MilkitError, match="MIL benchmark not found"):
        load_mil_benchmark("musk3")


def test_small_formats_and_errors(tmp_path: Path) -> None:
    # MIProblems: 2 features x 5 instances, bags 2 (3 inst) and 1 (2 inst), given unsorted
    mip = tmp_path / "Toy"
    mip.mkdir()
    (mip / "data.csv").write_text("1\t2\t3\t4\t5\n10\t20\t30\t40\t50\n")
    (mip / "labels.csv").write_text("1\n0\n1\n0\n1\n")
    (mip / "bagids.csv").write_text("2\n1\n2\n1\n2\n")
    b = load_mil_benchmark(mip)
    assert b.name == "Toy" and b.bag_ids.tolist() == [1, 2] and b.labels.tolist() == [0, 1]
    assert b.bags[0].tolist() == [[2, 20], [4, 40]]
    assert b.bags[1].tolist() == [[1, 10], [3, 30], [5, 50]]
    # label,bag_id,features CSV with -1 negatives
    csv = tmp_path / "other" / "x_mil.csv"
    csv.parent.mkdir()
    csv.write_text("-1,1,0.5,1\n-1,1,0.25,2\n1,2,3,4\n")
    c = load_mil_benchmark(csv.parent)
    assert c.labels.tolist() == [0, 1] and c.bag_sizes.tolist() == [2, 1]
    (mip / "labels.csv").write_text("1\n0\n1\n")
    with pytest.raises(MilkitError, match="instance counts"):
        load_mil_benchmark(mip)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MilkitError, match="holds no MIL benchmark"):
        load_mil_benchmark(empty)


def test_standardizer_uses_training_bags_only() -> None:
    train = [np.array([[0.0, 5.0], [2.0, 5.0]]), np.array([[4.0, 5.0]])]
    test = [np.array([[100.0, 7.0]])]
    st = fit_standardizer(train)
    assert isinstance(st, Standardizer)
    np.testing.assert_allclose(st.mean, [2.0, 5.0])
    np.testing.assert_allclose(st.std, [np.std([0, 2, 4]), 1.0])  # constant feature: std 1
    z = np.concatenate(st.transform(train))
    np.testing.assert_allclose(z.mean(0), [0, 0], atol=1e-6)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(st.transform(test)[0], [[98 / np.std([0, 2, 4]), 2.0]], rtol=1e-6)


def test_folds_and_dataset(mil_benchmarks_dir: Path) -> None:
    b = load_mil_benchmark(mil_benchmarks_dir / "Musk1")
    folds = benchmark_folds(b.labels, folds=10, seed=0)
    assert len(folds) == 10
    tested = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tested), np.arange(92))
    train_idx, test_idx = folds[0]
    st = fit_standardizer([b.bags[i] for i in train_idx])
    ds = b.to_dataset(test_idx, standardizer=st)
    assert len(ds) == len(test_idx) and ds.slide_ids[0].startswith("Musk1_bag")
    assert ds.labels.tolist() == b.labels[test_idx].tolist()
    batch = collate_bags([ds[i] for i in range(3)])
    assert batch["features"].dtype == torch.float32 and batch["features"].shape[2] == 166
    assert batch["coords"] is None
