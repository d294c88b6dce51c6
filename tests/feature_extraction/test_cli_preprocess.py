"""`milkit preprocess` and `milkit info` end to end through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from milkit.cli import main
from milkit.io.bags import read_bag


def test_preprocess_help_shows_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "milkit preprocess slides/ --out bags/" in out and "--shard" in out


def test_preprocess_cli_records_failures_and_exits_nonzero(slides_dir, tmp_path, capsys):
    rc = main(
        [
            "preprocess",
            str(slides_dir / "synthetic/small.svs"),
            str(slides_dir / "broken.svs"),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--no-progress",
            "--float16",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 empty" in err and "1 failed" in err and "FAILED broken: cannot open slide" in err
    bag = read_bag(tmp_path / "small.h5")
    assert bag.features.dtype == np.float16 and bag.features.shape == (0, 218)
    assert (tmp_path / "manifest.csv").is_file()
    # A rerun with the same settings skips the finished slide; float32 would mix dtypes.
    rerun = ["preprocess", str(slides_dir / "synthetic/small.svs"), "--out", str(tmp_path)]
    rerun += ["--workers", "0", "--no-progress"]
    assert main([*rerun, "--float16"]) == 0
    assert "1 skipped (already done with the same settings: 0 ok, 1 empty)" in (
        capsys.readouterr().out
    )
    assert main(rerun) == 1
    assert "dtype 'float16' → 'float32' (--float16)" in capsys.readouterr().err


def test_preprocess_cli_mpp_options(slides_dir, tmp_path, capsys):
    boxes = str(slides_dir / "synthetic/boxes.tiff")
    args = ["preprocess", boxes, "--out", str(tmp_path), "--workers", "0", "--no-progress"]
    assert main([*args, "--slide-mpp", "0.25", "--mpp", "0.5", "--patch-size", "32"]) == 0
    bag = read_bag(tmp_path / "boxes.h5")
    attrs = bag.coords_attrs
    assert attrs["mpp_level0"] == 0.25 and attrs["target_mpp"] == pytest.approx(0.5, rel=0.03)
    assert attrs["patch_size"] == 32 and attrs["patch_level"] == 1  # level 1 = 2x of 0.25
    with pytest.raises(SystemExit):
        main([*args, "--mpp", "0.5", "--magnification", "20"])
    capsys.readouterr()


def test_preprocess_cli_user_errors(slides_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hc

    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no slides found" in capsys.readouterr().err
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    small = str(slides_dir / "synthetic/small.svs")
    assert main(["preprocess", small, "--out", str(tmp_path / "o"), "--encoder", "uni"]) == 2
    err = capsys.readouterr().err
    assert "MahmoodLab/UNI" in err and "--weights" in err
    assert main(["preprocess", small, "--out", str(tmp_path / "o"), "--shard", "3/2"]) == 2
    assert "shard" in capsys.readouterr().err
    assert main(["preprocess", small, "--out", str(tmp_path / "o"), "--encoder", "resnet"]) == 2
    assert "resnet50-trunc" in capsys.readouterr().err


def test_info_slide_text_and_json(slides_dir, capsys):
    assert main(["info", str(slides_dir / "CMU-1-Small-Region.svs")]) == 0
    out = capsys.readouterr().out
    assert "vendor: aperio" in out and "2220 x 2967" in out and "mpp: 0.499" in out
    assert "magnification: 20x" in out
    assert main(["info", str(slides_dir / "synthetic/boxes.tiff"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [lv["width"] for lv in d["levels"]] == [300, 150, 75, 37]
    assert d["mpp"] is None and "absurd" in d["mpp_error"]


def test_info_bag_and_errors(slides_dir, tmp_path, capsys):
    main(
        [
            "preprocess",
            str(slides_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--no-progress",
            "--no-qc",
        ]
    )
    assert not (tmp_path / "qc").exists()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "CMU-1-Small-Region.h5"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    n = read_bag(tmp_path / "CMU-1-Small-Region.h5").num_instances
    assert d["num_instances"] == n and d["dim"] == 218 and d["encoder"] == "fast"
    assert d["source"] == "milkit" and d["coords_attrs"]["patch_size"] == 256
    assert d["root_attrs"]["slide_id"] == "CMU-1-Small-Region"
    assert main(["info", str(tmp_path / "CMU-1-Small-Region.h5")]) == 0
    out = capsys.readouterr().out
    assert f"instances x dim: {n} x 218" in out and "encoder: fast" in out
    assert main(["info", str(tmp_path / "missing.h5")]) == 2
    assert "path not found" in capsys.readouterr().err
    assert main(["info", str(slides_dir / "broken.svs")]) == 2
    assert "cannot open slide" in capsys.readouterr().err
    assert main(["info", "--encoders"]) == 0
    assert "resnet50-trunc" in capsys.readouterr().out


def test_preprocess_help_lists_every_choice(capsys):
    from milkit.feature_extraction.encoders import list_encoders
    from milkit.feature_extraction.tissue import PRESETS

    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert f"(one of: {', '.join(PRESETS)})" in out and "biopsy" in out
    assert f"(one of: {', '.join(list_encoders())})" in out
    assert "{auto,fp32,fp16,bf16,int8}" in out
