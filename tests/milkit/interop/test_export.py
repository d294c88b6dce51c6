"""`milkit export --to clam|trident` and CLAM's split files."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milkit.cli import main
from milkit.data.splits import FoldSplit, load_splits, save_splits
from milkit.errors import MilkitError
from milkit.interop.export import (
    export_bags,
    read_clam_splits,
    trident_tiling_folder,
    write_clam_splits,
)
from milkit.io.bags import write_bag

TRIDENT_ATTRS = {
    "patch_size": 256,
    "patch_size_level0": 512,
    "level0_magnification": 40.0,
    "target_magnification": 20.0,
    "overlap": 0,
    "level0_width": 4096,
    "level0_height": 2048,
    "patch_level": 0,
}


def _grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 512, np.zeros(n, np.int64)], axis=1)


def _bags(folder: Path) -> dict[str, np.ndarray]:
    """Three bags as users have them: float32 and float16 milkit bags, a TRIDENT-style .pt."""
    rng = np.random.default_rng(0)
    feats = {
        "s32": rng.normal(size=(5, 6)).astype(np.float32),
        "s16": rng.normal(size=(4, 6)).astype(np.float16),
        "spt": rng.normal(size=(3, 6)).astype(np.float32),
    }
    for sid in ("s32", "s16"):
        write_bag(
            folder / f"{sid}.h5",
            feats[sid],
            _grid(len(feats[sid])),
            coords_attrs={**TRIDENT_ATTRS, "name": sid},
            features_attrs={"encoder": "uni_v1"},
            dtype=feats[sid].dtype,
        )
    torch.save(feats["spt"], folder / "spt.pt")
    return feats


def _clam_getitem(data_dir: Path, slide_id: str, use_h5: bool):
    """What CLAM's Generic_MIL_Dataset.__getitem__ reads (dataset_modules/dataset_generic.py)."""
    if not use_h5:
        return torch.load(os.path.join(data_dir, "pt_files", f"{slide_id}.pt"))
    with h5py.File(os.path.join(data_dir, "h5_files", f"{slide_id}.h5"), "r") as f:
        return torch.from_numpy(f["features"][:]), f["coords"][:]


def test_clam_export_reads_back_as_clam_does(tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    feats = _bags(bags)
    out = tmp_path / "clam"
    result = export_bags(bags, out, "clam")
    assert result.failed == {}
    for sid, ref in feats.items():
        tensor = _clam_getitem(out, sid, use_h5=False)
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape
        np.testing.assert_array_equal(tensor.numpy(), ref.astype(np.float32))
    # float32 bag: h5_files entry is the bag itself (a link); float16: a float32 copy
    assert os.path.samefile(out / "h5_files" / "s32.h5", bags / "s32.h5")
    assert not os.path.samefile(out / "h5_files" / "s16.h5", bags / "s16.h5")
    feats16, coords16 = _clam_getitem(out, "s16", use_h5=True)
    assert feats16.dtype == torch.float32
    np.testing.assert_array_equal(feats16.numpy(), feats["s16"].astype(np.float32))
    np.testing.assert_array_equal(coords16, _grid(4))
    # a .pt bag has no coords: pt_files only, said in a note
    assert not (out / "h5_files" / "spt.h5").exists()
    assert any("spt" in n and "no coords" in n for n in result.notes)
    assert set(result.linked) == {"s32"}
    assert not list(out.rglob("*.partial"))


def test_copy_and_symlink_fallback(tmp_path, monkeypatch):
    bags = tmp_path / "bags"
    bags.mkdir()
    _bags(bags)
    copied = export_bags(bags, tmp_path / "c", "clam", copy=True)
    dst = tmp_path / "c" / "h5_files" / "s32.h5"
    assert not os.path.samefile(dst, bags / "s32.h5") and not dst.is_symlink()
    assert dst.read_bytes() == (bags / "s32.h5").read_bytes()
    assert copied.linked == {}

    def no_hard_links(*_a, **_k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    export_bags(bags, tmp_path / "s", "clam")
    link = tmp_path / "s" / "h5_files" / "s32.h5"
    assert link.is_symlink() and link.resolve() == (bags / "s32.h5").resolve()


def test_trident_export_tree_and_attributes(tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    feats = _bags(bags)
    # a CLAM bag without magnifications cannot join a TRIDENT tree
    with h5py.File(bags / "clamonly.h5", "w") as f:
        f["features"] = np.ones((2, 6), np.float32)
        f["coords"] = _grid(2)
        f["coords"].attrs["patch_level"] = 0
        f["coords"].attrs["patch_size"] = 256
    job = tmp_path / "job"
    result = export_bags(bags, job, "trident")
    tiling = job / "20x_256px_0px_overlap"
    assert result.folders == {tiling / "features_uni_v1"}
    for sid in ("s32", "s16"):
        feat_file = tiling / "features_uni_v1" / f"{sid}.h5"
        assert os.path.samefile(feat_file, bags / f"{sid}.h5")  # already TRIDENT's layout
        with h5py.File(feat_file, "r") as f:
            np.testing.assert_array_equal(f["features"][:], feats[sid])  # dtype kept
            assert f["features"].dtype == feats[sid].dtype
        # TRIDENT's read_coords: every attribute of patches/<slide>_patches.h5 'coords'
        with h5py.File(tiling / "patches" / f"{sid}_patches.h5", "r") as f:
            attrs = dict(f["coords"].attrs)
            np.testing.assert_array_equal(f["coords"][:], _grid(len(feats[sid])))
        for key in ("patch_size", "level0_magnification", "target_magnification"):
            assert attrs[key] == TRIDENT_ATTRS[key]
        assert attrs["patch_size_level0"] == 512 and attrs["name"] == sid
        assert attrs["savetodir"] == str(tiling)
    assert set(result.failed) == {"clamonly", "spt"}
    assert "level0_magnification" in result.failed["clamonly"]
    assert "clamonly.h5" in result.failed["clamonly"]
    assert "no coords" in result.failed["spt"]


def test_trident_folder_name_and_encoder_override(tmp_path):
    assert trident_tiling_folder({**TRIDENT_ATTRS, "target_magnification": 2.5}) == (
        "2.5x_256px_0px_overlap"
    )
    assert trident_tiling_folder({**TRIDENT_ATTRS, "overlap": 32}) == "20x_256px_32px_overlap"
    bags = tmp_path / "bags"
    bags.mkdir()
    write_bag(bags / "a.h5", np.ones((2, 3), np.float32), _grid(2), coords_attrs=TRIDENT_ATTRS)
    result = export_bags(bags, tmp_path / "j", "trident")
    assert "does not name its encoder" in result.failed["a"] and "--encoder" in result.failed["a"]
    result = export_bags(bags, tmp_path / "j", "trident", encoder="conch v1.5")
    assert (tmp_path / "j" / "20x_256px_0px_overlap" / "features_conch_v1.5" / "a.h5").is_file()


def test_cli_export_summary_failures_and_splits(tmp_path, capsys):
    bags = tmp_path / "bags"
    bags.mkdir()
    _bags(bags)
    splits = [FoldSplit(0, ["s32"], ["s16"], ["spt"]), FoldSplit(1, ["spt", "s16"], [], ["s32"])]
    save_splits(splits, tmp_path / "splits.csv")
    rc = main(["export", "--to", "clam", str(bags), str(tmp_path / "o"), "--splits",
               str(tmp_path / "splits.csv")])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0
    assert "3 slide(s) to clam layout" in out.out and "2 CLAM split file(s)" in out.out
    assert load_splits(tmp_path / "o" / "splits") == splits  # CLAM files read back
    rc = main(["export", "--to", "trident", str(bags), str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 1 and "1 slide(s) failed" in err and "spt" in err
    rc = main(["export", "--to", "trident", str(bags), str(tmp_path / "t"), "--splits", "x.csv"])
    assert rc == 2 and "--splits applies to --to clam only" in capsys.readouterr().err
    assert main(["export", "--to", "clam", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------- CLAM split files
def _clam_save_splits(ids: list[list[str]], filename: Path, boolean_style: bool = False) -> None:
    """CLAM's save_splits (dataset_modules/dataset_generic.py) on lists of slide ids."""
    splits = [pd.Series(x, name="slide_id", dtype=object) for x in ids]
    if not boolean_style:
        df = pd.concat(splits, ignore_index=True, axis=1)
        df.columns = ["train", "val", "test"]
    else:
        df = pd.concat(splits, ignore_index=True, axis=0)
        index = df.values.tolist()
        one_hot = np.eye(len(splits)).astype(bool)
        bool_array = np.repeat(one_hot, [len(x) for x in ids], axis=0)
        df = pd.DataFrame(bool_array, index=index, columns=["train", "val", "test"])
    df.to_csv(filename)


def test_clam_wide_and_bool_split_files(tmp_path):
    ids = [["001", "002", "010", "011"], ["003"], ["004", "005"]]  # zero padding must survive
    _clam_save_splits(ids, tmp_path / "splits_3.csv")
    assert (tmp_path / "splits_3.csv").read_text().splitlines()[0] == ",train,val,test"
    (fold,) = load_splits(tmp_path / "splits_3.csv")
    assert (fold.fold, fold.train, fold.val, fold.test) == (3, ids[0], ids[1], ids[2])
    _clam_save_splits(ids, tmp_path / "splits_3_bool.csv", boolean_style=True)
    (bool_fold,) = read_clam_splits(tmp_path / "splits_3_bool.csv")
    assert bool_fold == fold


def test_clam_split_folder_as_create_splits_seq_writes_it(tmp_path):
    for k in range(3):
        ids = [[f"t{k}a", f"t{k}b"], [f"v{k}"], [f"x{k}"]]
        _clam_save_splits(ids, tmp_path / f"splits_{k}.csv")
        _clam_save_splits(ids, tmp_path / f"splits_{k}_bool.csv", boolean_style=True)
        pd.DataFrame({"train": [1], "val": [1], "test": [1]}).to_csv(
            tmp_path / f"splits_{k}_descriptor.csv"
        )
    folds = load_splits(tmp_path)
    assert [f.fold for f in folds] == [0, 1, 2]
    assert folds[2].train == ["t2a", "t2b"] and folds[2].test == ["x2"]
    assert (
        write_clam_splits(folds, tmp_path / "again")
        and read_clam_splits(tmp_path / "again") == folds
    )


def test_clam_split_errors_name_the_file(tmp_path):
    _clam_save_splits([["a", "b"], ["b"], []], tmp_path / "splits_0.csv")
    with pytest.raises(MilkitError, match=r"two parts.*'b'.*splits_0\.csv"):
        load_splits(tmp_path / "splits_0.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MilkitError, match=r"no CLAM split files"):
        load_splits(tmp_path / "empty")
    (tmp_path / "w.csv").write_text(",train,val\n0,a,b\n")
    with pytest.raises(MilkitError, match=r"lacks column"):
        load_splits(tmp_path / "w.csv")


def test_exported_folders_read_back_as_bags(tmp_path):
    from milkit.data.datasets import BagDataset
    from milkit.data.labels import load_labels

    bags = tmp_path / "bags"
    bags.mkdir()
    feats = _bags(bags)
    export_bags(bags, tmp_path / "clam", "clam")
    export_bags(bags, tmp_path / "job", "trident")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["s32", "s16", "spt"], "label": ["a", "b", "a"]}).to_csv(csv)
    table = load_labels(csv, tmp_path / "clam" / "pt_files")
    ds = BagDataset.from_table(table)
    for i, sid in enumerate(ds.slide_ids):
        np.testing.assert_array_equal(ds.load(i)[0].numpy(), feats[sid].astype(np.float32))
    features_dir = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    assert sorted(p.name for p in features_dir.iterdir()) == ["s16.h5", "s32.h5"]
    assert len(load_labels(csv, features_dir, skip_missing=True)) == 2
