"""`milkit report --run RUN [--slides DIR]`: numbers, figures, heatmaps, tiles, and a real browser."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from milkit.cli import main
from milkit.errors import MilkitError
from milkit.evaluation.run_report import (
    brier_score,
    build_run_report,
    plot_calibration,
    plot_confusion,
    read_run_predictions,
)
from milkit.io.bags import write_bag
from milkit.training.metrics import classification_metrics
from tests.milkit.training._train_helpers import one_thread, planted_bags  # noqa: F401 (autouse fixture)

CMU = "CMU-1-Small-Region.svs"  # 2220 x 2967 px, one level
SLIDES_WITH_FILES = ("s000", "s001", "s002", "s003", "s004", "s005")


@pytest.fixture(scope="module")
def run_with_slides(tmp_path_factory):
    """A 2-fold abmil run on 16 bags whose tiles lie on copies of a real slide."""
    from tests.conftest import SLIDES

    source = Path(SLIDES) / CMU
    if not source.is_file():
        pytest.skip(f"needs {source}")
    root = tmp_path_factory.mktemp("report")
    bags, labels = planted_bags(16, 8, 0, min_n=6, max_n=20, shift=10.0)
    rows = []
    for i, (x, y) in enumerate(zip(bags, labels)):
        sid = f"s{i:03d}"
        n = len(x)
        coords = np.stack([(np.arange(n) % 8) * 256, (np.arange(n) // 8) * 256 + 512], 1)
        attrs = {"patch_size_level0": 256, "level0_width": 2220, "level0_height": 2967}
        write_bag(root / "bags" / f"{sid}.h5", x, coords, coords_attrs=attrs)
        rows.append({"slide_id": sid, "label": ["benign", "tumour"][y]})
        if sid in SLIDES_WITH_FILES:  # copies: a folder scan counts a file once
            (root / "slides").mkdir(exist_ok=True)
            shutil.copyfile(source, root / "slides" / f"{sid}.svs")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    rc = main(["train", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"),
               "--folds", "2", "--out", str(root / "run"), "--model", "abmil", "--model-arg",
               "fc_dim=16", "--model-arg", "attn_dim=8", "--epochs", "3", "--lr", "0.02",
               "--no-progress", "--seed", "2"])  # fmt: skip
    assert rc == 0
    return root


@pytest.mark.slow
def test_report_numbers_match_the_run(run_with_slides, capsys):
    root = run_with_slides
    run = root / "run"
    rc = main(["report", "--run", str(run), "--bootstrap", "60", "--out", str(root / "plain")])
    assert rc == 0 and "pooled AUC" in capsys.readouterr().out
    md = (root / "plain" / "report.md").read_text()
    html = (root / "plain" / "index.html").read_text()
    # per-fold values are the ones training stored
    for k in (0, 1):
        stored = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        row = next(line for line in md.splitlines() if line.startswith(f"| fold {k} |"))
        # 8-slide folds (4 per class): milkit.training.metrics gives no bootstrap CI (issue 9, fault 8)
        assert f"| {stored['auc']:.3f} |" in row and f"| {stored['accuracy']:.3f} |" in row
    # pooled = metrics of all out-of-fold predictions together
    preds = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in (0, 1))
    y = (preds["label"] == "tumour").to_numpy().astype(int)
    p = preds[["prob_benign", "prob_tumour"]].to_numpy()
    pooled = classification_metrics(y, p, ["benign", "tumour"])
    assert f"| AUC | {pooled['auc']:.3f} |" in md
    assert f"| Balanced accuracy | {pooled['balanced_accuracy']:.3f} |" in md
    cm = np.asarray(pooled["confusion_matrix"])
    assert f"| benign | {cm[0, 0]} | {cm[0, 1]} |" in md
    # the report's predictions.csv holds every test slide once
    table = pd.read_csv(root / "plain" / "predictions.csv")
    assert sorted(table["slide_id"]) == sorted(preds["slide_id"]) and len(table) == 16
    # the same images in both renderings, all present
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(srcs) == sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert set(srcs) == {"img/roc.png", "img/confusion.png", "img/calibration.png"}
    assert all((root / "plain" / s).is_file() for s in srcs)
    assert "--slides DIR" in md  # tells how to get heatmaps


@pytest.mark.slow
def test_report_cis_contain_the_value_and_brier_matches_sklearn(run_with_slides):
    from sklearn.metrics import brier_score_loss

    report = build_run_report(run_with_slides / "run", run_with_slides / "ci", bootstrap=80)
    intervals = [(v, lo, hi) for v, lo, hi in report.pooled.values() if not math.isnan(lo)]
    assert intervals  # 16 pooled slides, 8 per class: CIs exist unless every resample agrees
    for value, low, high in intervals:
        assert low <= value + 1e-12 and value <= high + 1e-12
    preds = read_run_predictions(run_with_slides / "run")
    assert brier_score(preds.y, preds.probs) == pytest.approx(
        brier_score_loss(preds.y, preds.probs[:, 1])
    )


@pytest.mark.slow
def test_report_with_slides_draws_heatmaps_and_the_top_tiles(run_with_slides):
    from milkit.feature_extraction.slides import Slide
    from milkit.training.inference import attention_scores

    root = run_with_slides
    out = root / "with_slides"
    report = build_run_report(
        root / "run", out, slides_dir=root / "slides", bootstrap=0, top_k=3, max_slides=4
    )
    assert len(report.slides_drawn) == 4 and set(report.slides_drawn) <= set(SLIDES_WITH_FILES)
    preds = read_run_predictions(root / "run").frame.set_index("slide_id")
    md = (out / "report.md").read_text()
    for sid in report.slides_drawn:
        heat = out / "img" / f"heatmap_{sid}.png"
        assert Image.open(heat).size[0] > 900
        # the top tile is the argmax of the attention of the fold that tested the slide
        fold = int(preds.loc[sid, "fold"])
        scores, _, _ = attention_scores(root / "run", root / "bags" / f"{sid}.h5", fold=str(fold))
        import h5py

        with h5py.File(root / "bags" / f"{sid}.h5") as f:
            coords = f["coords"][:]
        x, y = coords[int(np.argmax(scores))]
        assert f"#1: attention {scores.max():.3g} at ({x}, {y})" in md
        tile = np.asarray(Image.open(out / "img" / "tiles" / f"{sid}_top1.png").convert("RGB"))
        with Slide(root / "slides" / f"{sid}.svs") as slide:
            region = slide.read_region((int(x), int(y)), 0, (256, 256))
        expected = np.asarray(Image.fromarray(region).resize((192, 192), Image.Resampling.LANCZOS))
        assert np.abs(tile.astype(int) - expected.astype(int)).max() <= 1
    # misclassified slides come first
    wrong = [s for s in preds.index if preds.loc[s, "label"] != preds.loc[s, "pred"]]
    wrong = [s for s in wrong if s in SLIDES_WITH_FILES]
    assert (
        report.slides_drawn[: len(wrong)]
        == sorted(wrong, key=lambda s: -preds.loc[s, ["prob_benign", "prob_tumour"]].max())[:4]
    )


@pytest.mark.slow
def test_report_errors(run_with_slides, tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert "not a milkit run folder" in capsys.readouterr().err
    root = run_with_slides
    with pytest.raises(MilkitError, match="not test slides of this run"):
        build_run_report(root / "run", tmp_path / "r", slides_dir=root / "slides",
                         bootstrap=0, slide_ids=["nope"])  # fmt: skip
    with pytest.raises(MilkitError, match="no slide file or bag"):
        build_run_report(root / "run", tmp_path / "r", slides_dir=root / "slides",
                         bootstrap=0, slide_ids=["s015"])  # fmt: skip


@pytest.mark.slow
def test_unfinished_folds_are_said(run_with_slides, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_slides / "run", run)
    (run / "fold_1" / "predictions.csv").unlink()
    report = build_run_report(run, bootstrap=0)
    assert report.index_html == run / "report" / "index.html"
    assert [m["fold"] for m in report.folds] == [0]
    assert any("fold(s) [1] have no test predictions" in n for n in report.notes)
    assert "fold(s) [1] have no test predictions" in (run / "report" / "report.md").read_text()


def test_multiclass_figures_and_brier(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], size=60)
    probs[np.arange(60), y] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    names = ["a", "b", "c"]
    png, n_bins = plot_calibration(y, probs, names, tmp_path / "cal.png")
    assert n_bins == 10 and Image.open(png).size == (560, 640)
    cm = np.asarray(classification_metrics(y, probs, names)["confusion_matrix"])
    assert Image.open(plot_confusion(cm, names, tmp_path / "cm.png")).size[0] >= 470
    onehot = np.eye(3)[y]
    assert brier_score(y, probs) == pytest.approx(np.mean(((probs - onehot) ** 2).sum(axis=1)))


# ---------------------------------------------------------------------------- real browser
def _chromium() -> str | None:
    """A Chromium that starts (Ubuntu's snap stub named chromium does not, in containers)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            try:
                done = subprocess.run([path, "--version"], capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                return path
    return None


_CHROMIUM = _chromium()


_CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src"));
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", JSON.stringify(broken));
});
</script>"""


def _browser(page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = page.parent / ".chromium-profile"
    cmd = [
        _CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-file-access-from-files",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
        page.as_uri(),
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def browser_image_check(index_html: Path) -> tuple[int, list[str]]:
    """(number of <img>, srcs that did not load) as Chromium sees ``index_html``."""
    page = index_html.with_name("_browser_check.html")
    page.write_text(index_html.read_text().replace("</body>", _CHECK_SCRIPT + "\n</body>"))
    try:
        dom = _browser(page, "--dump-dom").stdout
    finally:
        page.unlink()
    found = re.search(r'<body data-images="(\d+)" data-broken="([^"]*)"', dom)
    assert found, f"the check script did not run; DOM starts {dom[:300]!r}"
    broken = json.loads(found.group(2).replace("&quot;", '"'))
    return int(found.group(1)), broken


@pytest.mark.slow
@pytest.mark.skipif(_CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_report_in_a_real_browser(run_with_slides, tmp_path):
    root = run_with_slides
    out = root / "browser"
    report = build_run_report(
        root / "run", out, slides_dir=root / "slides", bootstrap=0, top_k=2, max_slides=2
    )
    n_images, broken = browser_image_check(report.index_html)
    expected = len(re.findall(r"<img ", report.index_html.read_text()))
    assert n_images == expected == 3 + 2 * (1 + 2) and broken == []
    # the checker sees a broken image (so the check above can fail)
    bad = tmp_path / "bad" / "index.html"
    bad.parent.mkdir()
    shutil.copytree(out / "img", bad.parent / "img")
    (bad.parent / "img" / "roc.png").unlink()
    (bad.parent / "img" / "confusion.png").write_bytes(b"not a png")
    bad.write_text(report.index_html.read_text())
    n_bad, broken = browser_image_check(bad)
    assert n_bad == n_images and sorted(broken) == ["img/confusion.png", "img/roc.png"]
    # a screenshot of the page as a reader sees it
    shot = out / "screenshot.png"
    _browser(report.index_html, f"--screenshot={shot}", "--window-size=1280,2400")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    assert (img < 250).mean() > 0.05  # not a blank page
    if os.environ.get("MILKIT_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MILKIT_KEEP_SCREENSHOT"])
