"""The labels table as users write it: numbers, NA spellings, case, extensions, columns, skips.

Issue 9, faults 3 and 4: ``1`` and ``1.0`` were two classes, ``NA``/``nan`` were classes,
``Tumour``/``tumour`` were two classes, ``S01.svs`` was a "missing bag", a ``slide`` column could
not be named, and one failed slide blocked the cohort.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.data.label_cells import (
    MISSING_LABELS,
    canonical_label,
    class_sort_key,
    is_missing_label,
    label_key,
    strip_slide_extension,
)
from milkit.data.labels import load_labels
from milkit.errors import MilkitError
from milkit.io.bags import write_bag


def _bag(path: Path, n: int = 4, dim: int = 8, seed: int = 0, **attrs) -> None:
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    coords = np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], axis=1)
    write_bag(path, feats, coords, **attrs)


def _cohort(tmp_path: Path, ids: list[str]) -> Path:
    bags = tmp_path / "bags"
    for i, sid in enumerate(ids):
        _bag(bags / f"{sid}.h5", seed=i)
    return bags


def _csv(path: Path, rows: list[str], header: str = "slide_id,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ------------------------------------------------------------------ fault 3: label values


def test_numeric_labels_compare_as_numbers(tmp_path: Path) -> None:
    """A pandas round trip writes 1.0 beside 1: still two classes, not four."""
    bags = _cohort(tmp_path, [f"s{i}" for i in range(6)])
    rows = ["s0,0", "s1,1", "s2,0.0", "s3,1.0", "s4, 01", "s5,0"]
    table = load_labels(_csv(tmp_path / "l.csv", rows), bags)
    assert table.class_names == ["0", "1"]
    assert table.frame["label_idx"].tolist() == [0, 1, 0, 1, 1, 0]
    assert table.frame["label"].tolist() == ["0", "1", "0", "1", "1", "0"]


def test_numeric_classes_sort_numerically(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c"])
    table = load_labels(_csv(tmp_path / "l.csv", ["a,10", "b,2", "c,2.0"]), bags)
    assert table.class_names == ["2", "10"]


@pytest.mark.parametrize("spelling", ["NA", "N/A", "nan", "NaN", "None", "null", "", "   "])
def test_missing_value_spellings_are_missing_labels(tmp_path: Path, spelling: str) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c"])
    csv_path = _csv(tmp_path / "l.csv", ["a,x", "b,y", f"c,{spelling}"])
    with pytest.raises(MilkitError) as info:
        load_labels(csv_path, bags)
    problems = info.value.problems  # type: ignore[attr-defined]
    assert list(problems) == ["missing label"]
    assert problems["missing label"][0].startswith("c")
    assert "missing label (1): c" in str(info.value)


def test_case_and_space_variants_are_refused_naming_both(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c", "d", "e"])
    rows = ["a,Tumour", "b,Tumour", "c,tumour", "d,Normal", "e,Normal "]
    with pytest.raises(MilkitError) as info:
        load_labels(_csv(tmp_path / "l.csv", rows), bags)
    msg = str(info.value)
    assert "differ only by case or spaces (2)" in msg
    assert "'Tumour' (2: a, b) vs 'tumour' (1: c)" in msg
    assert "'Normal' (1: d) vs 'Normal ' (1: e)" in msg


def test_inner_space_variants_are_refused(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c"])
    rows = ["a,high grade", "b,high  grade", "c,low"]
    with pytest.raises(MilkitError, match=r"'high grade' \(1: a\) vs 'high  grade' \(1: b\)"):
        load_labels(_csv(tmp_path / "l.csv", rows), bags)


def test_consistent_leading_space_is_one_class(tmp_path: Path) -> None:
    """``S01, Tumour`` on every row is one spelling: stripped, no conflict."""
    bags = _cohort(tmp_path, ["a", "b"])
    table = load_labels(_csv(tmp_path / "l.csv", ["a, Tumour", "b, Normal"]), bags)
    assert table.class_names == ["Normal", "Tumour"]


def test_known_classes_match_numbers(tmp_path: Path) -> None:
    """predict --labels: the run says "1.0"/"0.0" (an older run), the CSV 1 and 0."""
    bags = _cohort(tmp_path, ["a", "b"])
    table = load_labels(_csv(tmp_path / "l.csv", ["a,1", "b,0"]), bags, class_names=["0.0", "1.0"])
    assert table.frame["label_idx"].tolist() == [1, 0]
    assert table.frame["label"].tolist() == ["1.0", "0.0"]  # the run's spelling


# ------------------------------------------------------------------ fault 4: ids and columns


@pytest.mark.parametrize("ext", [".svs", ".ndpi", ".tiff", ".mrxs", ".SVS", ".ome.tiff", ".h5"])
def test_slide_file_extension_is_stripped_with_a_note(tmp_path: Path, ext: str) -> None:
    bags = _cohort(tmp_path, ["S01", "S02"])
    table = load_labels(_csv(tmp_path / "l.csv", [f"S01{ext},a", "S02,b"]), bags)
    assert table.slide_ids == ["S01", "S02"]
    assert len(table.notes) == 1 and f"S01{ext} -> S01" in table.notes[0]


def test_extension_kept_when_the_bag_has_it(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["S01.svs", "S02"])  # a bag named S01.svs.h5
    table = load_labels(_csv(tmp_path / "l.csv", ["S01.svs,a", "S02,b"]), bags)
    assert table.slide_ids == ["S01.svs", "S02"] and table.notes == []


def test_id_with_and_without_extension_is_a_duplicate(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["S01", "S02"])
    with pytest.raises(MilkitError, match=r"duplicated slide_id \(1\): S01"):
        load_labels(_csv(tmp_path / "l.csv", ["S01.svs,a", "S01,a", "S02,b"]), bags)


def test_extension_list_is_preprocessings() -> None:
    from milkit.feature_extraction.batch import SLIDE_EXTENSIONS

    for ext in SLIDE_EXTENSIONS:
        assert strip_slide_extension(f"X1{ext}") == "X1"
    assert strip_slide_extension("X1.ome.tif") == "X1"
    assert strip_slide_extension("X1") is None
    assert strip_slide_extension("X1.2") is None  # a dotted id is not an extension


def test_named_columns(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c", "d"])
    csv_path = _csv(
        tmp_path / "l.csv",
        ["a,p1,HER2+,x", "b,p1,HER2-,x", "c,p2,HER2+,x", "d,p3,HER2-,x"],
        header="slide,patient,her2,label",
    )
    with pytest.raises(MilkitError, match=r"lacks column.*--slide-column slide"):
        load_labels(csv_path, bags)
    table = load_labels(
        csv_path, bags, slide_column="slide", label_column="her2", case_column="patient"
    )
    assert table.class_names == ["HER2+", "HER2-"]
    assert table.frame["case_id"].tolist() == ["p1", "p1", "p2", "p3"]
    with pytest.raises(MilkitError, match=r"lacks column\(s\) \['case'\]"):
        load_labels(csv_path, bags, slide_column="slide", label_column="her2", case_column="case")


def _manifest(bags: Path, rows: list[tuple[str, str, str]]) -> None:
    with (bags / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "status", "error"])
        w.writerows(rows)


def test_failed_slide_blocks_with_reason_then_skip_missing_logs_it(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b", "c", "d", "stale"])
    write_bag(bags / "empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    _manifest(bags, [("a", "ok", ""), ("broken", "failed", "cannot open slide"),
                     ("stale", "failed", "tile read error")])  # fmt: skip
    rows = ["a,x", "b,y", "c,x", "d,y", "broken,x", "ghost,y", "empty,x", "stale,y"]
    csv_path = _csv(tmp_path / "l.csv", rows)
    with pytest.raises(MilkitError) as info:
        load_labels(csv_path, bags)
    msg = str(info.value)
    assert "missing bag (2): broken (preprocessing failed: cannot open slide), ghost" in msg
    assert "listed as failed in manifest.csv (1): stale (preprocessing failed: tile read" in msg
    assert "empty bag (0 instances) (1): empty" in msg
    assert "--skip-missing" in msg

    table = load_labels(csv_path, bags, skip_missing=True)
    assert table.slide_ids == ["a", "b", "c", "d"]
    assert dict(table.skipped) == {
        "broken": "missing bag: preprocessing failed: cannot open slide",
        "ghost": "missing bag",
        "empty": "empty bag (0 instances)",
        "stale": "listed as failed in manifest.csv: preprocessing failed: tile read error",
    }
    assert any("--skip-missing: left out 4 slide(s)" in n for n in table.notes)
    out = table.write_skipped(tmp_path / "run")
    lines = out.read_text().splitlines()
    assert lines[0] == "slide_id,reason" and len(lines) == 5 and lines[2] == "ghost,missing bag"


def test_skip_missing_still_refuses_label_problems(tmp_path: Path) -> None:
    bags = _cohort(tmp_path, ["a", "b"])
    with pytest.raises(MilkitError, match="missing label"):
        load_labels(_csv(tmp_path / "l.csv", ["a,x", "b,NA", "c,y"]), bags, skip_missing=True)


def test_skip_missing_recomputes_classes(tmp_path: Path) -> None:
    """A class that only the skipped slides carry leaves a single class: refused."""
    bags = _cohort(tmp_path, ["a", "b"])
    with pytest.raises(MilkitError, match="only one class"):
        load_labels(_csv(tmp_path / "l.csv", ["a,x", "b,x", "c,y"]), bags, skip_missing=True)


# ------------------------------------------------------------------ properties

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters=",\n\r\"'"), max_size=12)


@settings(max_examples=200, deadline=None)
@given(x=st.integers(-1000, 1000), pad=st.sampled_from(["", " ", "  "]),
       form=st.sampled_from(["{}", "{}.0", "{}.00", "{:.1e}"]))  # fmt: skip
def test_property_integers_in_any_spelling_are_one_class(x: int, pad: str, form: str) -> None:
    spelled = pad + form.format(x) + pad
    if form == "{:.1e}" and abs(x) >= 100:  # 1.2e+02 loses digits: a different number
        return
    assert canonical_label(spelled) == str(x)


@settings(max_examples=200, deadline=None)
@given(raw=_TEXT)
def test_property_canonical_label_is_idempotent_and_stripped(raw: str) -> None:
    name = canonical_label(raw)
    if name is None:
        assert is_missing_label(raw)
        return
    assert canonical_label(name) == name
    assert name == name.strip() and name != ""


@settings(max_examples=100, deadline=None)
@given(spelling=st.sampled_from(sorted(MISSING_LABELS)), case=st.sampled_from([str.upper, str.lower, str.title]),
       pad=st.sampled_from(["", " ", "\t"]))  # fmt: skip
def test_property_missing_spellings_in_any_case(spelling, case, pad) -> None:
    assert canonical_label(pad + case(spelling) + pad) is None


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text("abcXYZéß", min_size=1, max_size=5), min_size=1, max_size=3))
def test_property_case_and_space_variants_share_a_key(words: list[str]) -> None:
    name = " ".join(words)
    variants = [name.upper(), name.lower(), " " + "  ".join(words) + " ", "".join(words)]
    assert {label_key(v) for v in variants} == {label_key(name)}
    assert label_key(name + "x") != label_key(name)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(-50, 50), min_size=2, max_size=10, unique=True))
def test_property_numeric_classes_sort_by_value(values: list[int]) -> None:
    names = sorted((str(v) for v in values), key=class_sort_key)
    assert [int(n) for n in names] == sorted(values)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["0", "1", "0.0", "1.0", " 1", "01"]), min_size=4, max_size=8)
)
def test_property_table_classes_are_the_numbers_present(tmp_path_factory, labels) -> None:
    if len({float(v) for v in labels}) < 2:
        return
    tmp = tmp_path_factory.mktemp("p")
    ids = [f"s{i}" for i in range(len(labels))]
    bags = _cohort(tmp, ids)
    table = load_labels(
        _csv(tmp / "l.csv", [f"{s},{v}" for s, v in zip(ids, labels, strict=True)]),
        bags,
        check_finite=False,
    )
    assert table.class_names == ["0", "1"]
    assert table.frame["label_idx"].tolist() == [int(float(v)) for v in labels]
