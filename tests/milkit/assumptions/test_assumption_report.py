"""The assumption-check chart is readable: nothing cut off, the legend off the bars, AUC 0 seen."""

from __future__ import annotations

import math

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle
from PIL import Image

from milkit.assumptions.report import plot_results, results_figure
from milkit.assumptions.runner import DID_NOT_LEARN, ERROR, FAIL, PASS, TestResult

NAN = float("nan")


def _result(model: str, test: str, verdict: str, auc: float) -> TestResult:
    lo, hi = (max(auc - 0.05, 0.0), min(auc + 0.05, 1.0)) if math.isfinite(auc) else (NAN, NAN)
    return TestResult(model, test, verdict, 0.99, auc, lo, hi, True, {}, [], 1.0)


def _cohort(n_models: int) -> list[TestResult]:
    """Every verdict, AUCs at 0, 1 and near the legend's corner (the old legend sat on a bar)."""
    names = ["abmil", "transmil-sattention", "clam-sb", "dsmil", "mean-pool", "rrt-mil"]
    cases = [(PASS, 1.0), (FAIL, 0.0), (DID_NOT_LEARN, 0.5), (ERROR, NAN), (PASS, 0.12)]
    out = []
    for i in range(n_models):
        for j, test in enumerate(("t1", "t2", "t3")):
            verdict, auc = cases[(i + j) % len(cases)]
            out.append(_result(names[i], test, verdict, auc))
    return out


def _drawn(results):
    fig = results_figure(results)
    FigureCanvasAgg(fig).draw()
    return fig, fig.canvas.get_renderer()


@pytest.mark.parametrize("n_models", [1, 2, 6])
def test_every_text_is_inside_the_figure(n_models):
    """Before: the title ran past both edges of a one- or two-model chart."""
    fig, renderer = _drawn(_cohort(n_models))
    box = fig.bbox
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text")) if t.get_text().strip()]
    assert len(texts) > 3 * n_models  # title, tick labels, bar labels, legend entries
    for text in texts:
        ext = text.get_window_extent(renderer)
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, text.get_text()
        assert ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, text.get_text()


@pytest.mark.parametrize("n_models", [1, 2, 6])
def test_legend_covers_no_bar_and_no_marker(n_models):
    """Before: the legend sat in the lower right corner, over the last model's bars."""
    fig, renderer = _drawn(_cohort(n_models))
    (legend,) = fig.legends
    where = legend.get_window_extent(renderer)
    ax = fig.axes[0]
    drawn = [p for p in ax.patches if isinstance(p, Rectangle)] + [
        line for line in ax.lines if line.get_gid()
    ]
    assert len(drawn) >= 3 * n_models
    for artist in drawn:
        assert not where.overlaps(artist.get_window_extent(renderer)), artist.get_gid()
    assert not where.overlaps(ax.get_window_extent(renderer))


def test_auc_zero_and_missing_auc_are_drawn():
    """Before: a test AUC of 0 (and an AUC-less ERROR) drew nothing at all."""
    results = [
        _result("abmil", "t1", FAIL, 0.0),
        _result("abmil", "t2", PASS, 1.0),
        _result("abmil", "t3", ERROR, NAN),
    ]
    fig, renderer = _drawn(results)
    ax = fig.axes[0]
    markers = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    zero = markers["abmil/t1"]
    assert list(zero.get_ydata()) == [0.0] and zero.get_marker() == "D"
    assert zero.get_markersize() >= 4  # a visible marker, not a hairline
    spine_y = ax.spines["bottom"].get_window_extent(renderer).y1
    assert zero.get_window_extent(renderer).y0 > spine_y  # above the axis line, not on it
    assert markers["abmil/t3"].get_marker() == "x"
    labels = {t.get_text() for t in ax.texts}
    assert {"T1\n0.00", "T2\n1.00", "T3\nn/a"} <= labels


def test_png_is_written(tmp_path):
    out = tmp_path / "report.png"
    plot_results(_cohort(2), out)
    with Image.open(out) as im:
        assert im.width >= 700 and im.height >= 550


def test_report_json_round_trips_and_the_table_gives_the_sd_over_seeds(tmp_path):
    import json

    from milkit.assumptions.report import markdown_table, save_report, test_auc_sd
    from milkit.assumptions.runner import SeedResult

    seeds = [SeedResult(k, 1.0, auc, 40 - k, 2.0) for k, auc in enumerate((0.1, 0.3, 0.5))]
    result = TestResult(
        "abmil", "t1", FAIL, 1.0, 0.3, 0.25, 0.35, False, {"fc_dim": 64}, seeds, 6.0
    )
    save_report([result], tmp_path, plot=False)
    back = TestResult.from_dict(json.loads((tmp_path / "report.json").read_text())["results"][0])
    assert back.to_dict() == result.to_dict()
    assert test_auc_sd(back) == pytest.approx(0.2)  # sample sd of 0.1, 0.3, 0.5
    assert "1.000 / 0.300 ± 0.200 [0.250, 0.350] FAIL" in markdown_table([back])
    one_seed = TestResult("abmil", "t1", FAIL, 1.0, 0.3, 0.25, 0.35, False, {}, seeds[:1], 2.0)
    assert "±" not in markdown_table([one_seed]).split("\n")[2]
