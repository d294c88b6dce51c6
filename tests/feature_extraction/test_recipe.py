"""Resume compares the whole recipe a bag was made with; a changed setting is refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.cli import main
from milkit.feature_extraction.batch import read_manifest
from milkit.feature_extraction.extract import ExtractConfig, preprocess
from milkit.feature_extraction.recipe import build_recipe, recipe_differences
from milkit.feature_extraction.tissue import TissueParams
from milkit.io.bags import read_bag, read_bag_header

FAST = dict(encoder="fast", num_workers=0, progress=False, qc=False)
CMU = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def first_run(slides_dir, tmp_path_factory):
    """CMU-1-Small-Region preprocessed once with the defaults (256 px at 0.5 µm/px)."""
    out = tmp_path_factory.mktemp("bags")
    summary = preprocess([slides_dir / f"{CMU}.svs"], out, ExtractConfig(**FAST))
    assert [r.status for r in summary.results] == ["ok"]
    return out


@pytest.fixture
def bags(first_run, tmp_path):
    out = tmp_path / "bags"
    shutil.copytree(first_run, out)
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"patch_size": 512}, "patch_size 256 → 512 (--patch-size)"),
        ({"magnification": 10.0}, "magnification (none) → 10 (--magnification)"),
        ({"min_tissue": 0.8}, "min_tissue 0.25 → 0.8 (--min-tissue)"),
        ({"mpp": 1.0}, "mpp 0.5 → 1 (--mpp)"),
        ({"overlap": 32}, "overlap 0 → 32 (--overlap)"),
        ({"tissue_preset": "biopsy"}, "tissue_preset 'default' → 'biopsy' (--tissue-preset)"),
        ({"slide_mpp": 0.45}, "slide_mpp (none) → 0.45 (--slide-mpp / --mpp-csv)"),
        ({"dtype": "float16"}, "dtype 'float32' → 'float16' (--float16)"),
        ({"pen_ink": ()}, 'tissue.pen_ink ["blue", "green", "black"] → [] (--pen-ink'),
    ],
)
def test_changed_setting_is_refused_naming_the_field(bags, slides_dir, change, named):
    if set(change) - {f.name for f in dataclasses.fields(ExtractConfig)}:
        pytest.skip(f"this checkout has no {change} option")
    bag = bags / f"{CMU}.h5"
    before = bag.stat().st_mtime_ns
    summary = preprocess([slides_dir / f"{CMU}.svs"], bags, ExtractConfig(**FAST, **change))
    (result,) = summary.results
    assert result.status == "failed" and summary.exit_code == 1
    assert named in result.error, result.error
    assert "--overwrite" in result.error and "--out" in result.error
    assert str(bag) in result.error
    assert bag.stat().st_mtime_ns == before  # the old bag is untouched
    assert read_bag_header(bag).coords_attrs["patch_size"] == 256
    assert read_manifest(bags)[CMU]["status"] == "failed"
    # The unchanged recipe still resumes (and the manifest row describes the bag again).
    summary = preprocess([slides_dir / f"{CMU}.svs"], bags, ExtractConfig(**FAST))
    assert [r.status for r in summary.results] == ["skipped"] and summary.exit_code == 0
    assert read_manifest(bags)[CMU]["status"] == "ok"
    assert bag.stat().st_mtime_ns == before


def test_cli_refusal_then_overwrite(bags, slides_dir, capsys):
    args = ["preprocess", str(slides_dir / f"{CMU}.svs"), "--out", str(bags), "--workers", "0"]
    args += ["--no-progress", "--no-qc", "--patch-size", "512", "--magnification", "10"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "patch_size 256 → 512" in err and "magnification (none) → 10" in err
    assert "mpp 0.5 → (none)" in err and "1 failed" in err
    assert main([*args, "--overwrite"]) == 0
    attrs = read_bag(bags / f"{CMU}.h5").coords_attrs
    assert attrs["patch_size"] == 512 and attrs["target_magnification"] == pytest.approx(10)
    assert main(args) == 0  # the new recipe now resumes
    assert "1 skipped" in capsys.readouterr().out


def test_identical_rerun_skips_and_recipe_is_recorded(bags, slides_dir):
    bag = bags / f"{CMU}.h5"
    recipe = json.loads(read_bag_header(bag).root_attrs["recipe"])
    assert recipe["encoder"] == "fast" and recipe["patch_size"] == 256
    assert recipe["mpp"] == 0.5 and recipe["magnification"] is None
    assert recipe["min_tissue"] == 0.25 and recipe["tissue_preset"] == "default"
    assert recipe["tissue"] == TissueParams().to_dict() and recipe["precision"] == "fp32"
    assert json.loads(read_manifest(bags)[CMU]["recipe"]) == recipe
    # Giving the default explicitly is the same recipe; so are runtime-only options.
    cfg = ExtractConfig(**{**FAST, "num_workers": 1}, mpp=0.5, batch_size=7)
    summary = preprocess([slides_dir / f"{CMU}.svs"], bags, cfg)
    assert [r.status for r in summary.results] == ["skipped"]


def test_bag_from_before_recipes_is_still_compared(bags, slides_dir):
    """Bags written before the recipe attribute existed: compared on what they recorded."""
    bag = bags / f"{CMU}.h5"
    with h5py.File(bag, "a") as f:
        del f.attrs["recipe"]
    summary = preprocess([slides_dir / f"{CMU}.svs"], bags, ExtractConfig(**FAST))
    assert [r.status for r in summary.results] == ["skipped"]
    summary = preprocess([slides_dir / f"{CMU}.svs"], bags, ExtractConfig(**FAST, patch_size=512))
    assert summary.results[0].status == "failed"
    assert "patch_size 256 → 512" in summary.results[0].error


def _recipe(config: ExtractConfig, **kw):
    kw = {"weights_sha256": None, "precision": "fp32", "slide_mpp": None, **kw}
    return build_recipe(config, **kw)


def test_whole_config_is_compared_so_new_fields_are_covered():
    """A field added to ExtractConfig (or TissueParams) later enters the recipe by itself."""
    Extended = dataclasses.make_dataclass(
        "Extended", [("future_option", int, dataclasses.field(default=1))], bases=(ExtractConfig,)
    )
    old, new = _recipe(Extended(future_option=1)), _recipe(Extended(future_option=2))
    assert old["future_option"] == 1
    assert recipe_differences(old, new) == [("future_option", 1, 2)]

    @dataclasses.dataclass(frozen=True)
    class InkParams(TissueParams):
        ink_hue: float = 0.6

    a = _recipe(ExtractConfig(tissue_params=InkParams()))
    b = _recipe(ExtractConfig(tissue_params=InkParams(ink_hue=0.5, otsu_floor=20)))
    assert a["tissue_preset"] == "custom"
    assert recipe_differences(a, b) == [
        ("tissue.ink_hue", 0.6, 0.5),
        ("tissue.otsu_floor", 15, 20),
    ]
    # Encoder, its weights and the precision it ran at are part of the recipe.
    c = _recipe(ExtractConfig(), weights_sha256="ab" * 32, precision="bf16")
    assert [d[0] for d in recipe_differences(_recipe(ExtractConfig()), c)] == [
        "encoder_weights_sha256",
        "precision",
    ]


def test_an_option_folded_into_the_tissue_parameters_is_compared_once():
    """--pen-ink enters as tissue.pen_ink: giving the default explicitly is the same recipe."""
    if "pen_ink" not in {f.name for f in dataclasses.fields(ExtractConfig)}:
        pytest.skip("this checkout has no pen_ink option")
    default = _recipe(ExtractConfig())
    same = _recipe(ExtractConfig(pen_ink=tuple(default["tissue"]["pen_ink"])))
    assert recipe_differences(default, same) == []
    off = recipe_differences(default, _recipe(ExtractConfig(pen_ink=())))
    assert [d[0] for d in off] == ["tissue.pen_ink"]


def test_runtime_options_are_not_part_of_the_recipe(tmp_path: Path):
    a = _recipe(ExtractConfig())
    b = _recipe(
        ExtractConfig(
            batch_size=3,
            num_workers=0,
            device="cpu",
            shard=(1, 2),
            overwrite=True,
            qc=False,
            progress=False,
            weights=tmp_path / "w.bin",  # the weights enter through their hash
            mpp_csv=tmp_path / "m.csv",  # per-slide mpp enters as slide_mpp
        )
    )
    assert recipe_differences(a, b) == []


_SETTINGS = {
    "patch_size": st.sampled_from([224, 256, 512]),
    "overlap": st.sampled_from([0, 16]),
    "min_tissue": st.sampled_from([0.0, 0.25, 0.5]),
    "mpp": st.sampled_from([None, 0.25, 0.5, 1.0]),
    "tissue_preset": st.sampled_from(["default", "biopsy", "resection"]),
    "dtype": st.sampled_from(["float32", "float16"]),
}


@settings(max_examples=60, deadline=None)
@given(a=st.fixed_dictionaries(_SETTINGS), b=st.fixed_dictionaries(_SETTINGS))
def test_differences_are_exactly_the_changed_settings(a, b):
    ra, rb = _recipe(ExtractConfig(**a)), _recipe(ExtractConfig(**b))

    def norm(d, k):  # no target mpp means the default 0.5 µm/px
        return (d[k] or 0.5) if k == "mpp" else d[k]

    changed = {k for k in a if norm(a, k) != norm(b, k)}
    names = {key.split(".")[0] for key, _, _ in recipe_differences(ra, rb)}
    # A preset change shows as the name and as the parameters it changes.
    assert names - {"tissue"} == changed
    assert ("tissue" in names) == (a["tissue_preset"] != b["tissue_preset"])
    assert recipe_differences(ra, ra) == []


def test_unreadable_recorded_recipe_fails_that_slide_only(bags, slides_dir):
    with h5py.File(bags / f"{CMU}.h5", "a") as f:
        f.attrs["recipe"] = "{not json"
    slides = [slides_dir / f"{CMU}.svs", slides_dir / "synthetic/small.svs"]
    summary = preprocess(slides, bags, ExtractConfig(**FAST))
    status = {r.slide_id: r for r in summary.results}
    assert status["small"].status == "empty"  # the run went on
    assert status[CMU].status == "failed" and "cannot be compared" in status[CMU].error
    assert "--overwrite" in status[CMU].error
