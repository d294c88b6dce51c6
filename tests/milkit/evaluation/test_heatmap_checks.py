"""`milkit heatmap` draws a bag only on its own slide, refuses bad bags in one line, and its text
scales with the image (issue 10, faults 5 and 6)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from milkit.cli import main
from milkit.errors import MilkitError
from milkit.evaluation.heatmap import check_slide_matches_bag, heatmap_figure, heatmap_for_slide
from milkit.feature_extraction.encoders.registry import file_sha256
from milkit.io.bags import write_bag
from tests.milkit.training._train_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.milkit.training.test_cv import make_cohort

CMU_DIMS = (2220, 2967)
CMU_ID = "CMU-1-Small-Region"


def _cmu_bag(path: Path, slide: Path, dim: int = 8, n: int = 2, **root) -> Path:
    """A bag recording what `milkit preprocess` records about CMU-1-Small-Region."""
    coords = np.stack([np.arange(n) * 256, np.zeros(n, dtype=int)], 1)
    attrs = {"patch_size_level0": 256, "level0_width": CMU_DIMS[0], "level0_height": CMU_DIMS[1]}
    record = {"slide_id": CMU_ID, "slide_sha256": file_sha256(slide),
              "slide_size": slide.stat().st_size, **root}  # fmt: skip
    feats = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    return write_bag(path, feats, coords, coords_attrs=attrs, root_attrs=record)


@pytest.fixture()
def cmu(slides_dir: Path) -> Path:
    return slides_dir / "CMU-1-Small-Region.svs"


def test_own_slide_passes(cmu: Path, tmp_path: Path) -> None:
    bag = _cmu_bag(tmp_path / f"{CMU_ID}.h5", cmu)
    assert check_slide_matches_bag(bag, cmu, CMU_DIMS) == []


def test_other_slide_is_refused_naming_both(cmu: Path, tmp_path: Path) -> None:
    bag = _cmu_bag(tmp_path / f"{CMU_ID}.h5", cmu)
    other = tmp_path / "S2.svs"
    for allow in (False, True):  # a different level-0 size is never drawn
        with pytest.raises(
            MilkitError, match=r"CMU-1-Small-Region.*2220 × 2967.*S2\.svs.*4000 × 3000"
        ):
            check_slide_matches_bag(bag, other, (4000, 3000), allow_mismatch=allow)
    out = tmp_path / "h.png"
    with pytest.raises(MilkitError, match="level-0 sizes differ"):
        from milkit.feature_extraction.synthetic import make_synthetic_slide

        make_synthetic_slide(other, 4000, 3000, seed=1)
        heatmap_for_slide(other, bag, [0.1, 0.9], out, allow_slide_mismatch=True)
    assert not out.exists()


def test_renamed_copy_needs_the_override(cmu: Path, tmp_path: Path) -> None:
    bag = _cmu_bag(tmp_path / f"{CMU_ID}.h5", cmu)
    renamed = tmp_path / "case_17.svs"
    shutil.copyfile(cmu, renamed)
    with pytest.raises(
        MilkitError, match=r"slide id 'CMU-1-Small-Region' ≠ 'case_17'.*--allow-slide-mismatch"
    ):
        check_slide_matches_bag(bag, renamed, CMU_DIMS)
    notes = check_slide_matches_bag(bag, renamed, CMU_DIMS, allow_mismatch=True)
    assert len(notes) == 1 and "case_17.svs" in notes[0] and "drawn anyway" in notes[0]
    drawn: list[str] = []
    out = heatmap_for_slide(renamed, bag, [0.1, 0.9], tmp_path / "h.png", thumbnail_size=200,
                            allow_slide_mismatch=True, notes=drawn)  # fmt: skip
    assert out.exists() and drawn == notes
    with pytest.warns(UserWarning, match="drawn anyway"):  # no notes list: a warning, not silence
        heatmap_for_slide(renamed, bag, [0.1, 0.9], tmp_path / "w.png", thumbnail_size=200,
                          allow_slide_mismatch=True)  # fmt: skip


def test_same_name_other_content_is_refused(cmu: Path, tmp_path: Path) -> None:
    wrong_sha = _cmu_bag(tmp_path / "a" / f"{CMU_ID}.h5", cmu, slide_sha256="0" * 64)
    with pytest.raises(MilkitError, match="sha256 000000000000… ≠ ed92d5a9f2e8…"):
        check_slide_matches_bag(wrong_sha, cmu, CMU_DIMS)
    # Slides over the hash limit were recorded without a hash: size is what is compared, and
    # the check never hashes them (documented trade-off for multi-GB slides).
    assert check_slide_matches_bag(wrong_sha, cmu, CMU_DIMS, hash_limit=1000) == []
    wrong_size = _cmu_bag(tmp_path / "b" / f"{CMU_ID}.h5", cmu, slide_size=123)
    with pytest.raises(MilkitError, match="file size 123 ≠ 1938955 bytes"):
        check_slide_matches_bag(wrong_size, cmu, CMU_DIMS, hash_limit=1000)


def test_clam_bag_without_sizes_must_lie_inside_the_slide(cmu: Path, tmp_path: Path) -> None:
    coords = np.array([[0, 0], [4096, 4096]])
    bag = write_bag(tmp_path / f"{CMU_ID}.h5", np.zeros((2, 4), np.float32), coords,
                    coords_attrs={"patch_size": 256, "downsample": [1.0, 1.0]})  # fmt: skip
    with pytest.raises(MilkitError, match=r"tiles up to \(4352, 4352\) px, outside"):
        check_slide_matches_bag(bag, cmu, CMU_DIMS)


def _font_px(text) -> float:
    return text.get_fontsize() * text.figure.dpi / 72.0


def test_heatmap_text_scales_with_the_image() -> None:
    coords = np.array([[0, 0], [1000, 1000]])

    def texts(side: int):
        fig = heatmap_figure(np.full((side, side, 3), 200, np.uint8), coords, [0.2, 0.8], 256,
                             (2000, 2000), title="S1: tumour (p=0.91)", label="attention")  # fmt: skip
        cax = fig.axes[0]
        ticks = [t for t in cax.get_yticklabels() if t.get_text()]
        return fig, [*fig.texts, *ticks]

    _, big_texts = texts(2000)
    shown = {t.get_text() for t in big_texts}
    assert {"S1: tumour (p=0.91)", "attention", "0.2", "0.5", "0.8"} <= shown
    assert min(_font_px(t) for t in big_texts) >= 2000 / 60 - 1  # not ~10 px on 2,000 px
    _, small_texts = texts(150)
    assert min(_font_px(t) for t in small_texts) >= 12


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hm")
    csv, bags = make_cohort(root, n=12, shift=10.0)
    out = root / "run"
    rc = main(["train", "--bags", str(bags), "--labels", str(csv), "--folds", "2", "--out",
               str(out), "--model", "abmil", "--model-arg", "fc_dim=8", "--model-arg",
               "attn_dim=4", "--epochs", "1", "--no-progress", "--seed", "0"])  # fmt: skip
    assert rc == 0
    return out


def _heatmap(run: Path, bag: Path, out: Path, *extra: str) -> int:
    return main(["heatmap", "--run", str(run), "--bag", str(bag), "--out", str(out),
                 "--device", "cpu", *extra])  # fmt: skip


def test_command_refuses_bad_bags_in_one_line(run: Path, tmp_path: Path, capsys) -> None:
    wide = write_bag(tmp_path / "wide.h5", np.zeros((3, 5), np.float32), np.zeros((3, 2), int))
    assert _heatmap(run, wide, tmp_path / "w.png") == 2
    err = capsys.readouterr().err.strip()
    assert "feature dimension differs from the run's in_dim 8" in err and "wide (5)" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    empty = write_bag(tmp_path / "empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), int))
    assert _heatmap(run, empty, tmp_path / "e.png") == 2
    err = capsys.readouterr().err.strip()
    assert "bag is empty (no tiles)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w.png").exists() and not (tmp_path / "e.png").exists()


@pytest.mark.slow
def test_command_checks_the_slide(run: Path, cmu: Path, tmp_path: Path, capsys) -> None:
    bag = _cmu_bag(tmp_path / f"{CMU_ID}.h5", cmu)
    assert _heatmap(run, bag, tmp_path / "ok.png", "--slide", str(cmu)) == 0
    renamed = tmp_path / "other_name.svs"
    shutil.copyfile(cmu, renamed)
    capsys.readouterr()
    assert _heatmap(run, bag, tmp_path / "no.png", "--slide", str(renamed)) == 2
    err = capsys.readouterr().err
    assert (
        "CMU-1-Small-Region" in err and "other_name" in err and not (tmp_path / "no.png").exists()
    )
    assert _heatmap(run, bag, tmp_path / "yes.png", "--slide", str(renamed),
                    "--allow-slide-mismatch") == 0  # fmt: skip
    assert "drawn anyway" in capsys.readouterr().err and (tmp_path / "yes.png").exists()


def test_dicom_series_is_known_by_its_folder(slides_dir: Path, tmp_path: Path) -> None:
    series = tmp_path / "scan_7"
    series.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copyfile(slides_dir / "synthetic" / name, series / name)
    attrs = {"patch_size_level0": 8, "level0_width": 16, "level0_height": 16}
    bag = write_bag(tmp_path / "scan_7.h5", np.zeros((1, 4), np.float32), np.zeros((1, 2), int),
                    coords_attrs=attrs, root_attrs={"slide_id": "scan_7"})  # fmt: skip
    assert check_slide_matches_bag(bag, series / "boxes_0.dcm", (16, 16)) == []
    assert check_slide_matches_bag(bag, series, (16, 16)) == []
    with pytest.raises(MilkitError, match="slide id 'scan_7'"):
        check_slide_matches_bag(bag, slides_dir / "synthetic" / "small.svs", (16, 16))
