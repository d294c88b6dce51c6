"""``milkit demo``: a tiny end-to-end run (library + CLI), resume, user errors, report pieces."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import milkit.demo.pipeline as demo
from milkit.cli import main
from milkit.demo.attention import outline_mask, summarise_localisation, tumour_localisation
from milkit.errors import MilkitError
from milkit.evaluation.document import (
    Document,
    Figure,
    Figures,
    Heading,
    Paragraph,
    Table,
    image_sources,
    to_html,
    to_markdown,
)

TINY = {"n_slides": 8, "slide_size": 2048, "folds": 2, "epochs": 4}
TINY_CHECK = {
    "seeds": (0,),
    "num_train": 40,
    "num_test": 40,
    "epochs": 2,
    "patience": None,
    "n_boot": 50,
}
TINY_ARGS = ["--slides", "8", "--size", "2048", "--folds", "2", "--epochs", "4"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory):
    """One tiny demo (8 slides of 2048 px, 2 folds, 4 epochs, demo-sized checks made tinier)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(demo, "CHECK_KW", TINY_CHECK)
    try:
        result = demo.run_demo(out, progress=False, **TINY)
    finally:
        mp.undo()
    return out, result


def _html_images(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_tiny_demo_writes_every_stage(tiny_demo) -> None:
    out, result = tiny_demo
    print("stage seconds", result.stage_seconds)
    assert len(list((out / "slides").glob("*.svs"))) == 8
    assert len(list((out / "bags").glob("*.h5"))) == 8
    assert len(list((out / "bags" / "qc").glob("*.png"))) == 8
    for k in (0, 1):
        assert (out / "run" / f"fold_{k}" / "best.pt").is_file()
        assert (out / "run" / f"fold_{k}" / "predictions.csv").is_file()
    assert (out / "run" / "summary.csv").is_file()
    checks = json.loads((out / "check" / "report.json").read_text())  # as `milkit check`
    assert [t["test"] for t in checks["results"]] == ["t1", "t2", "t3"]
    assert {t["verdict"] for t in checks["results"]} <= {"PASS", "FAIL", "DID NOT LEARN", "ERROR"}
    assert checks["config"]["model"] == "abmil" and checks["config"]["num_train"] == 40
    assert {p["property"] for p in result.properties} >= {"permutation", "padding"}
    assert [t["test"] for t in result.checks] == ["t1", "t2", "t3"]
    assert (out / "check" / "report.md").is_file() and (out / "check" / "report.png").is_file()
    labels = (out / "labels.csv").read_text().splitlines()
    assert labels[0] == "slide_id,label,case_id" and len(labels) == 9
    assert result.reused == []


@pytest.mark.slow
def test_report_links_only_existing_images(tiny_demo) -> None:
    out, result = tiny_demo
    index = out / "report" / "index.html"
    assert result.index_html == index and index.is_file()
    assert (out / "report" / "report.md").is_file()
    srcs = _html_images(index)
    names = {Path(s).name for s in srcs}
    assert "roc.png" in names
    assert any(n.startswith("heatmap_") for n in names)
    assert any(n.startswith("qc_") for n in names)
    for src in srcs:
        assert not src.startswith(("/", "http")), src  # relative: the folder moves as a whole
        png = out / "report" / src
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    md_links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report" / "report.md").read_text())
    assert sorted(md_links) == sorted(srcs)


_SIZES_SCRIPT = """<script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images).map(
    i => [i.getAttribute("src"), i.clientWidth, i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute("data-sizes", JSON.stringify(sizes));
});
</script>"""


@pytest.mark.slow
def test_report_shows_heatmaps_large_enough_to_read(tiny_demo) -> None:
    """Before: heatmaps (and QC images) were shown 520 (340) px wide, their ~19 px text at ~8 px."""
    from milkit.io.figures import font_px
    from tests.milkit.evaluation.test_report_run import _CHROMIUM, _browser

    out, _ = tiny_demo
    index = out / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    figs = re.findall(r'<figure( class="wide")?><a href="([^"]+)"><img src="[^"]+"( width)?', text)
    large = [f for f in figs if Path(f[1]).name.startswith(("heatmap_", "qc_", "checks"))]
    assert len(large) >= 3
    for wide, src, width in large:  # a row of their own, no display width below their own
        assert wide and not width, src
    if _CHROMIUM is None:
        pytest.skip("needs chromium for the on-screen sizes")
    page = index.with_name("_sizes.html")
    page.write_text(text.replace("</body>", _SIZES_SCRIPT + "\n</body>"), encoding="utf-8")
    try:
        dom = _browser(page, "--dump-dom", "--window-size=1280,1000").stdout
    finally:
        page.unlink()
    found = re.search(r'data-sizes="([^"]*)"', dom)
    assert found, dom[:300]
    sizes = {
        src: (shown, w, h) for src, shown, w, h in json.loads(found.group(1).replace("&quot;", '"'))
    }
    heatmaps = [s for s in sizes if Path(s).name.startswith("heatmap_")]
    assert heatmaps
    for src in heatmaps:
        shown, w, h = sizes[src]
        on_screen = font_px(w, h) * shown / w  # the title and colour-bar text, in screen px
        assert on_screen >= 12, (src, shown, w, on_screen)


@pytest.mark.slow
def test_instance_score_heatmaps_are_not_labelled_attention(tiny_demo, monkeypatch, tmp_path):
    """Before: tumour_heatmap drew 'log10(attn)' whatever label it was given."""
    import milkit.evaluation.heatmap as hm
    from milkit.demo.attention import tumour_heatmap
    from milkit.io.bags import read_bag_header

    out, _ = tiny_demo
    seen, real = [], hm.draw_heatmap
    monkeypatch.setattr(
        hm, "draw_heatmap", lambda *a, **k: seen.append(k["label"]) or real(*a, **k)
    )
    bag = sorted((out / "bags").glob("*.h5"))[0]
    n = read_bag_header(bag).num_instances
    tumour_heatmap(out / "slides" / f"{bag.stem}.svs", bag, np.full(n, 1.0 / n), tmp_path / "h.png",
                   title="t", label="log10(score)")  # fmt: skip
    assert seen == ["log10(score)"] and (tmp_path / "h.png").is_file()


@pytest.mark.slow
def test_metrics_and_localisation_are_reported(tiny_demo) -> None:
    out, result = tiny_demo
    assert [m["fold"] for m in result.fold_metrics] == [0, 1]
    assert sum(m["n"] for m in result.fold_metrics) == 8  # every slide tested exactly once
    for key in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        assert key in result.summary
        assert 0.0 <= result.summary[key]["mean"] <= 1.0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["summary"]["auc"]["mean"] == pytest.approx(result.summary["auc"]["mean"])
    assert summary["class_names"] == ["normal", "tumour"]
    loc = result.localisation
    assert loc["slides"] == 4  # the four tumour slides, all with tumour tiles
    assert 0.0 < loc["chance"] < 0.5
    assert 0.0 <= loc["top_hit_rate"] <= loc["best_possible"] <= 1.0
    html = (out / "report" / "index.html").read_text()
    for label in ("AUC", "Balanced accuracy", "F1 (macro)", "mean ± std", "t1", "t3"):
        assert label in html
    text = result.format()
    assert "mean ± std" in text and str(result.index_html.resolve()) in text


@pytest.mark.slow
def test_cli_rerun_reuses_every_stage(tiny_demo, capsys, monkeypatch) -> None:
    out, _ = tiny_demo
    monkeypatch.setattr(demo, "CHECK_KW", TINY_CHECK)
    slide = out / "slides" / "synth_000.svs"
    best = out / "run" / "fold_0" / "best.pt"
    before = (slide.stat().st_mtime_ns, best.stat().st_mtime_ns)
    capsys.readouterr()
    code = main(["demo", "--out", str(out), *TINY_ARGS, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"report: {(out / 'report' / 'index.html').resolve()}" in captured.out
    assert re.search(r"AUC\s+\S+\s+\S+\s+\S+ ± \S+", captured.out)
    assert (slide.stat().st_mtime_ns, best.stat().st_mtime_ns) == before
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["reused"]) == {"slides", "bags", "run", "check"}


@pytest.mark.slow
def test_cli_rerun_with_other_settings_says_what_to_do(tiny_demo, capsys) -> None:
    out, _ = tiny_demo
    code = main(["demo", "--out", str(out), *TINY_ARGS, "--seed", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "other settings" in err and "--overwrite" in err and str(out / "slides") in err


def test_model_typo_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(MilkitError, match="Did you mean: abmil") as info:
        demo.run_demo(tmp_path / "out", model="abmill", progress=False)
    assert "milkit models" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_slides": 5, "folds": 2}, "--slides 8"),
        ({"folds": 1}, "at least 2 folds"),
        ({"slide_size": 100}, "slide size"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_options_explain_the_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(MilkitError, match=re.escape(message)):
        demo.run_demo(tmp_path / "out", progress=False, **kwargs)


def test_out_of_memory_in_training_gives_a_hint(monkeypatch, tmp_path: Path) -> None:
    import torch

    import milkit.training.cv

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(milkit.training.cv, "cross_validate", boom)
    config = demo.train_config("abmil", 3, 0, None, False)
    with pytest.raises(MilkitError, match="--max-instances") as info:
        demo.train_cv(None, "abmil", config, tmp_path / "run", 2)
    assert "out of memory" in str(info.value)

    def other(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(milkit.training.cv, "cross_validate", other)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not disguised as an OOM
        demo.train_cv(None, "abmil", config, tmp_path / "run", 2)


def test_is_oom_recognises_cpu_and_cuda_messages() -> None:
    from milkit.runtime.oom import is_out_of_memory  # the one check the demo uses

    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: "
            "can't allocate memory: you tried... out of memory"
        )
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------------------- attention vs tumour


def test_localisation_numbers_on_a_hand_made_bag() -> None:
    n = 40
    cov = np.zeros(n)
    cov[[3, 17]] = [1.0, 0.5]  # two tumour tiles
    cov[25] = 0.05  # a clipped corner: below the 10 % rule, not a tumour tile
    att = np.full(n, 0.1)
    att[[3, 17]] = [5.0, 4.0]
    att /= att.sum()
    loc = tumour_localisation("s", att, cov)
    assert (loc.n_tiles, loc.n_tumour_tiles, loc.top_k) == (40, 2, 4)
    assert loc.top_hit_rate == pytest.approx(0.5)  # 2 of the top 4
    assert loc.best_possible == pytest.approx(0.5)
    assert loc.chance == pytest.approx(2 / 40)
    assert loc.enrichment == pytest.approx(10.0)
    assert loc.attention_mass == pytest.approx(9.0 / (9.0 + 38 * 0.1))


def test_localisation_multihead_is_averaged_and_lengths_checked() -> None:
    cov = np.array([0.0, 0.0, 1.0, 0.0])
    heads = np.array([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    loc = tumour_localisation("s", heads, cov)
    assert loc.top_k == 1 and loc.top_hit_rate == 1.0 and loc.attention_mass == pytest.approx(0.5)
    with pytest.raises(MilkitError, match="differ in length"):
        tumour_localisation("s", np.ones(3), cov)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_random_attention_hits_at_most_best_possible(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cov = rng.uniform(0, 1, n) * (rng.uniform(0, 1, n) < 0.2)
    att = rng.dirichlet(np.ones(n))
    loc = tumour_localisation("s", att, cov)
    assert loc.top_k == max(1, math.ceil(0.1 * n))
    assert 0.0 <= loc.top_hit_rate <= loc.best_possible <= 1.0
    # attention that ranks every tumour tile first reaches the best possible hit rate
    perfect = tumour_localisation("s", att + 10.0 * (cov >= 0.1), cov)
    assert perfect.top_hit_rate == pytest.approx(perfect.best_possible)


def test_summary_skips_slides_without_tumour_tiles() -> None:
    a = tumour_localisation("a", np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    b = tumour_localisation("b", np.array([0.5, 0.5]), np.array([0.0, 0.0]))
    s = summarise_localisation([a, b])
    assert s["slides"] == 1 and s["top_hit_rate"] == 1.0 and s["enrichment"] == 2.0
    assert summarise_localisation([b]) == {"slides": 0}


def test_outline_is_drawn_where_the_mask_is(tmp_path: Path) -> None:
    import cv2

    png = tmp_path / "h.png"
    img = np.full((120, 150, 3), 128, dtype=np.uint8)  # 100 x 100 heatmap + a side panel
    cv2.imwrite(str(png), img)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 6:9] = True  # level-0 (x 600-900, y 200-500) with 100-px mask pixels
    outline_mask(png, mask, 100, (1000, 1000), (100, 100))
    out = cv2.imread(str(png))
    changed = np.argwhere(np.any(out != 128, axis=2))
    assert len(changed) > 0
    ys, xs = changed[:, 0], changed[:, 1]
    assert xs.min() >= 55 and xs.max() <= 95 and ys.min() >= 15 and ys.max() <= 55
    assert np.all(out[:, 100:] == 128)  # the colour-bar panel is untouched


# ---------------------------------------------------------------------------- the document


def test_document_renders_the_same_content_twice() -> None:
    doc = Document("T <1>")
    doc.add(
        Heading("Metrics"),
        Paragraph("run `milkit demo` & see"),
        Table(["a", "b|c"], [["1", "PASS"], ["x", "FAIL"]], emph_rows=frozenset({1})),
        Figures([Figure("img/r.png", "ROC <pooled>", width=300)]),
    )
    html = to_html(doc)
    assert "<title>T &lt;1&gt;</title>" in html
    assert "<code>milkit demo</code> &amp; see" in html
    assert '<td class="pass">PASS</td>' in html and '<tr class="emph">' in html
    assert '<img src="img/r.png" width="300" alt="ROC &lt;pooled&gt;">' in html
    assert "http" not in html.split("<body>")[0].replace("http-equiv", "")  # nothing fetched
    md = to_markdown(doc)
    assert md.startswith("# T <1>\n")
    assert "| a | b\\|c |" in md and "| **x** | **FAIL** |" in md
    assert "![ROC <pooled>](img/r.png)" in md
    assert image_sources(doc) == ["img/r.png"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.text(max_size=12), min_size=3, max_size=3), max_size=5))
def test_any_cell_text_keeps_tables_well_formed(rows: list[list[str]]) -> None:
    doc = Document("t", [Table(["x", "y", "z"], rows)])
    html = to_html(doc)
    body = html.split("<table>")[1].split("</table>")[0]
    assert body.count("<tr") == len(rows) + 1
    assert body.count("<td") == 3 * len(rows)
    md_rows = [line for line in to_markdown(doc).splitlines() if line.startswith("|")]
    assert len(md_rows) == len(rows) + 2
    for line in md_rows:
        assert len(re.findall(r"(?<!\\)\|", line)) == 4  # 3 cells, no cell splits a row


# ---------------------------------------------------------------------------- stages and errors


def test_unknown_encoder_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(MilkitError, match=r"unknown encoder.*fast"):
        demo.run_demo(tmp_path / "out", encoder="fsat", progress=False)
    assert not (tmp_path / "out").exists()


def test_cohort_is_reused_remade_when_damaged_and_guarded(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    assert demo.make_cohort(slides, 8, 1024, 0) is False
    labels = (slides / "labels.csv").read_text()
    assert labels.count("tumour") == 4 and labels.count("normal") == 4
    assert demo.make_cohort(slides, 8, 1024, 0) is True  # reused
    (slides / "labels.csv").write_bytes(b"\x00\xff garbage")
    assert demo.make_cohort(slides, 8, 1024, 0) is False  # damaged: made again
    assert (slides / "labels.csv").read_text() == labels
    with pytest.raises(MilkitError, match="other settings") as info:
        demo.make_cohort(slides, 10, 1024, 0)
    assert "--overwrite" in str(info.value) and "'n_slides': 8" in str(info.value)


def _fake_result(sid: str, status: str, n_tiles: int = 10, error: str = "") -> SimpleNamespace:
    return SimpleNamespace(slide_id=sid, status=status, n_tiles=n_tiles, error=error)


def test_usable_bags_leave_out_failed_and_empty_slides() -> None:
    results = [
        _fake_result("a", "ok"),
        _fake_result("b", "skipped"),
        _fake_result("c", "failed", 0, "cannot open slide"),
        _fake_result("d", "ok", 0),
    ]
    ok, left_out = demo.usable_bags(SimpleNamespace(results=results))
    assert ok == {"a", "b"}
    assert left_out == {"c": "cannot open slide", "d": "no tissue tiles found (empty bag)"}


def test_too_few_usable_bags_names_the_first_error(monkeypatch, tmp_path: Path) -> None:
    results = [_fake_result(f"s{i}", "failed", 0, "no mpp in the slide") for i in range(8)]
    fake = SimpleNamespace(results=results, count=lambda status: 0, format=lambda: "8 failed")
    monkeypatch.setattr(demo, "make_cohort", lambda *a: True)
    monkeypatch.setattr(demo, "extract_bags", lambda *a: fake)
    with pytest.raises(MilkitError, match="8 of 8 slides gave no usable bag") as info:
        demo.run_demo(tmp_path / "out", progress=False, **TINY)
    message = str(info.value)
    assert "s0: no mpp in the slide" in message and "manifest.csv" in message
    assert "--overwrite" in message


def test_models_without_attention_are_scored_by_instances() -> None:
    import torch

    from milkit import models
    from milkit.data.datasets import InMemoryBagDataset
    from milkit.training.inference import instance_scores

    torch.manual_seed(0)
    net = models.create("mi-net", 6, 2)
    bags = [np.random.default_rng(i).normal(size=(n, 6)).astype(np.float32) for i, n in [(0, 5)]]
    dataset = InMemoryBagDataset(bags, [1], slide_ids=["s"])
    scores = instance_scores(net, dataset, positive_index=1)
    with torch.no_grad():
        logits = net(torch.from_numpy(bags[0])[None]).instance_logits[0]
    expected = torch.softmax(logits, dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(scores["s"], expected, rtol=1e-5, atol=1e-6)


def test_skipped_checks_say_how_to_run_them() -> None:
    from milkit.demo.report import checks_section

    blocks = checks_section([], [], "transmil")
    html = to_html(Document("t", blocks))
    assert "Skipped (--no-check)" in html and "<code>milkit check --model transmil</code>" in html


def test_overwrite_clears_only_the_demo_stage_folders(tmp_path: Path) -> None:
    for name in (*demo.STAGES, "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text("x")
    (tmp_path / "labels.csv").write_text("slide_id,label\n")
    (tmp_path / "mine.csv").write_text("keep")
    demo._clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv", "notes"]


def test_cli_help_shows_an_example(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "milkit demo --out demo_output" in out and "--overwrite" in out
    assert "--max-instances" in out and "--no-check" in out
