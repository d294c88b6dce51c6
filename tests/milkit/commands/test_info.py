"""`milkit info` and the CLI's output rules: pipes into head, floats as typed, mpp hints that work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.cli import main
from milkit.errors import MilkitError, tidy_floats
from milkit.feature_extraction.synthetic import make_plain_tiff
from milkit.io.bags import read_bag_header, write_bag
from tests.conftest import REPO

NOISY = 0.499 * (0.25 / 0.499)  # 0.24999999999999997, how --mpp 0.25 used to be printed


@pytest.fixture(scope="module")
def big_bag(tmp_path_factory) -> Path:
    """A bag whose `milkit info` text and JSON are far larger than a pipe's 64 KiB buffer."""
    path = tmp_path_factory.mktemp("bags") / "big.h5"
    notes = {f"note_{i:05d}": "x" * 100 for i in range(3000)}
    write_bag(path, np.zeros((3, 4), np.float32), np.zeros((3, 2), np.int64), root_attrs=notes)
    return path


@pytest.mark.parametrize("extra", ["", " --json"])
def test_info_piped_into_head_ends_quietly(big_bag: Path, extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = f"'{sys.executable}' -m milkit info '{big_bag}'{extra} | head -1"
    proc = subprocess.run(
        ["bash", "-c", f"{cmd}; echo status=${{PIPESTATUS[0]}} >&2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.stdout.count("\n") == 1
    assert proc.stdout.startswith("bag:" if not extra else "{")
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert "status=141" in proc.stderr  # cut short by the reader, like any Unix filter


def test_floats_are_shown_as_typed(slides_dir: Path, tmp_path: Path, capsys) -> None:
    assert repr(NOISY) == "0.24999999999999997"
    assert "got 0.25 " in str(MilkitError("x", value=NOISY, path="p"))
    assert tidy_floats({"a": [NOISY, np.float32(0.1)], "b": (1, "s")}) == {
        "a": [0.25, 0.1],
        "b": (1, "s"),
    }
    # The reported case: --mpp 0.25 on a 0.499 µm/px slide.
    args = ["preprocess", str(slides_dir / "CMU-1-Small-Region.svs"), "--out", str(tmp_path)]
    assert main([*args, "--mpp", "0.25", "--workers", "0", "--no-progress", "--no-qc"]) == 1
    err = capsys.readouterr().err
    assert "'target_mpp': 0.25," in err and "0.2499999" not in err
    # Attributes people read through `milkit info` are stored and printed short too.
    bag = tmp_path / "b.h5"
    write_bag(bag, np.zeros((0, 2)), np.zeros((0, 2)), coords_attrs={"target_mpp": NOISY})
    assert read_bag_header(bag).coords_attrs["target_mpp"] == 0.25
    assert main(["info", str(bag)]) == 0
    out = capsys.readouterr().out
    assert "target_mpp: 0.25\n" in out


def test_missing_mpp_hint_names_an_option_that_works(tmp_path: Path, capsys) -> None:
    slide = make_plain_tiff(tmp_path / "slides" / "nores.tif", 512, 512, mpp=None).path
    assert main(["info", str(slide)]) == 0
    out = capsys.readouterr().out
    assert "mpp: unknown" in out and "--slide-mpp VALUE" in out and "--mpp-csv FILE" in out
    base = ["preprocess", str(slide), "--workers", "0", "--no-progress", "--no-qc"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "no microns-per-pixel metadata" in err
    # The old advice (--mpp VALUE) sets the target resolution and fails again ...
    assert main([*base, "--out", str(tmp_path / "a"), "--mpp", "0.5"]) == 1
    assert "no microns-per-pixel metadata" in capsys.readouterr().err
    # ... the options the hint names now work, exactly as written there.
    option = re.search(r"(--slide-mpp) VALUE", err).group(1)
    assert main([*base, "--out", str(tmp_path / "b"), option, "0.5"]) == 0
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnores,0.5\n")  # the columns the hint names
    assert main([*base, "--out", str(tmp_path / "c"), "--mpp-csv", str(csv)]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "c" / "nores.h5")]) == 0
    assert "mpp_level0: 0.5" in capsys.readouterr().out


def test_info_explains_an_empty_bag(slides_dir: Path, tmp_path: Path, capsys) -> None:
    small = str(slides_dir / "synthetic/small.svs")
    assert (
        main(["preprocess", small, "--out", str(tmp_path), "--workers", "0", "--no-progress"]) == 0
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "small.h5")]) == 0
    out = capsys.readouterr().out
    assert "instances x dim: 0 x 218  (empty: smaller than one 256-px tile at 0.5 µm/px" in out


@settings(max_examples=200, deadline=None)
@given(
    digits=st.integers(1, 12),
    mantissa=st.integers(1, 10**12 - 1),
    exponent=st.integers(-8, 6),
    factor=st.floats(0.01, 100, allow_nan=False),
)
def test_tidy_floats_gives_back_what_was_typed(digits, mantissa, exponent, factor):
    """A value typed with ≤ 12 significant digits, after float noise, prints as typed."""
    significant = int(float(f"{mantissa:.{digits}g}"))  # at most `digits` significant digits
    typed = float(f"{significant}e{exponent}")
    noisy = typed * factor / factor
    assert repr(tidy_floats(noisy)) == repr(typed)


def test_info_says_where_the_mpp_comes_from(slides_dir: Path, tmp_path: Path, capsys) -> None:
    import tifffile

    assert main(["info", str(slides_dir / "CMU-1-Small-Region.svs")]) == 0
    assert "mpp: 0.499 µm/px (from openslide.mpp-x)" in capsys.readouterr().out
    ome = tmp_path / "s.ome.tif"
    pixels = np.full((32, 32, 3), 230, np.uint8)
    tifffile.imwrite(
        ome, pixels, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25}
    )
    assert main(["info", str(ome)]) == 0
    assert "mpp: 0.25 µm/px (from OME-XML PhysicalSizeX)" in capsys.readouterr().out
