"""Tables and a chart of assumption-check results: text, Markdown, CSV, JSON and PNG (atomic)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milkit.assumptions.generators import TEST_TITLES
from milkit.assumptions.runner import DID_NOT_LEARN, ERROR, FAIL, PASS, TestResult
from milkit.io.atomic import atomic_path, atomic_write_text

COLUMNS = (
    "model",
    "test",
    "verdict",
    "train_auc",
    "test_auc",
    "ci_low",
    "ci_high",
    "mil_respecting",
    "seeds",
    "wall_s",
)


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"


def result_rows(results: Sequence[TestResult]) -> list[dict[str, Any]]:
    """One flat dict per (model, test) with the ``COLUMNS`` keys."""
    return [
        {
            "model": r.model,
            "test": r.test,
            "verdict": r.verdict,
            "train_auc": r.train_auc,
            "test_auc": r.test_auc,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
            "mil_respecting": r.mil_respecting,
            "seeds": len(r.seeds),
            "wall_s": round(r.wall_s, 1),
        }
        for r in results
    ]


def test_auc_sd(r: TestResult) -> float:
    """Sample standard deviation (ddof 1) of the per-seed test AUCs; NaN with fewer than two."""
    values = [s.test_auc for s in r.seeds if s.test_auc is not None and math.isfinite(s.test_auc)]
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(r: TestResult) -> str:
    sd = test_auc_sd(r)
    spread = "" if not math.isfinite(sd) else f" ± {_fmt(sd)}"
    return (
        f"{_fmt(r.train_auc)} / {_fmt(r.test_auc)}{spread} "
        f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] {r.verdict}"
    )


def _grid(results: Sequence[TestResult]) -> tuple[list[str], list[str], dict]:
    models, tests = [], []
    cells: dict[tuple[str, str], TestResult] = {}
    for r in results:
        if r.model not in models:
            models.append(r.model)
        if r.test not in tests:
            tests.append(r.test)
        cells[(r.model, r.test)] = r
    return models, tests, cells


def markdown_table(results: Sequence[TestResult]) -> str:
    """Model × test grid; each cell: train AUC / test AUC [95% CI] verdict."""
    models, tests, cells = _grid(results)
    head = ["model", "MIL-respecting", *[TEST_TITLES.get(t, t) for t in tests]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        first = next(cells[(m, t)] for t in tests if (m, t) in cells)
        row = [f"`{m}`", "yes" if first.mil_respecting else "no"]
        row += [_cell(cells[(m, t)]) if (m, t) in cells else "" for t in tests]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Cells: mean train AUC / mean test AUC ± sd over seeds [bootstrap 95% CI] verdict."
    )
    return "\n".join(lines) + "\n"


def text_table(results: Sequence[TestResult]) -> str:
    """Plain aligned table for the terminal, one line per (model, test)."""
    header = ("model", "test", "train AUC", "test AUC", "95% CI", "verdict", "time")
    rows = [
        (
            r.model + (" *" if r.mil_respecting else ""),
            r.test,
            _fmt(r.train_auc),
            _fmt(r.test_auc),
            f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]",
            r.verdict + (f" ({r.error})" if r.error else ""),
            f"{r.wall_s:.0f}s",
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = io.StringIO()
    for row in (header, *rows):
        out.write("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() + "\n")
    out.write("* = model marked mil_respecting\n")
    return out.getvalue()


VERDICT_COLOURS = {PASS: "#2a9d8f", FAIL: "#e63946"}  # the rest (DID NOT LEARN, ERROR): grey
OTHER_COLOUR = "#adb5bd"
TITLE = "MIL assumption checks: mean test AUC over seeds (whiskers: bootstrap 95% CI)"


def results_figure(results: Sequence[TestResult], delta: float = 0.1) -> Any:
    """The chart of ``plot_results`` as a matplotlib ``Figure`` (constrained layout, not saved).

    One group of bars per model, one bar per test, coloured by verdict, labelled with the test
    and its AUC. Every result gets a marker at its AUC, so a test AUC of 0 is seen (a bar of
    height 0 is not), and a result without an AUC (error, no finite AUC) gets a grey ``x`` and
    ``n/a``. The legend (verdict colours, chance and FAIL lines) sits below the axes, off the bars.
    Artists of one result carry ``gid`` ``"<model>/<test>"``.
    """
    import textwrap

    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models, tests, cells = _grid(results)
    width_in = max(6.0, 0.9 * len(models) * len(tests) ** 0.5 + 3)
    fig = Figure(figsize=(width_in, 5.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(tests), 1)
    for j, t in enumerate(tests):
        for i, m in enumerate(models):
            r = cells.get((m, t))
            if r is None:
                continue
            x = i + (j - (len(tests) - 1) / 2) * width
            gid = f"{m}/{t}"
            if not math.isfinite(r.test_auc):  # no AUC: say so where the bar would be
                ax.plot([x], [0.0], marker="x", color="#6c757d", ms=7, mew=1.5, gid=gid)
                ax.text(x, 0.04, f"{t.upper()}\nn/a", ha="center", va="bottom", fontsize=7)
                continue
            colour = VERDICT_COLOURS.get(r.verdict, OTHER_COLOUR)
            ax.bar([x], [r.test_auc], width * 0.9, color=colour, edgecolor="black",
                   linewidth=0.4, gid=gid)  # fmt: skip
            lo = max(r.test_auc - r.ci_low, 0) if math.isfinite(r.ci_low) else 0
            hi = max(r.ci_high - r.test_auc, 0) if math.isfinite(r.ci_high) else 0
            ax.errorbar([x], [r.test_auc], yerr=[[lo], [hi]], fmt="none", ecolor="black",
                        capsize=2, lw=0.8)  # fmt: skip
            # the marker makes an AUC of 0 visible (the y axis starts below 0 for it)
            ax.plot([x], [r.test_auc], marker="D", ms=5, color=colour, mec="black", mew=0.6,
                    gid=gid, zorder=3)  # fmt: skip
            ax.text(x, r.test_auc + hi + 0.02, f"{t.upper()}\n{r.test_auc:.2f}", ha="center",
                    va="bottom", fontsize=7)  # fmt: skip
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0.5 - delta, color="#e63946", ls=":", lw=0.8)
    ax.set_xticks(np.arange(len(models)))
    tilt = len(models) > 2  # long names side by side would run into each other
    ax.set_xticklabels(models, rotation=35 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=8)  # fmt: skip
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(-0.06, 1.2)  # room below 0 for the AUC=0 marker, above 1 for the labels
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test AUC (shifted draw)")
    per_line = max(30, int(width_in * 72 / (0.62 * 11)))  # characters of an 11-pt title
    ax.set_title("\n".join(textwrap.wrap(TITLE, per_line)), fontsize=11)
    handles = [
        Patch(facecolor=VERDICT_COLOURS[PASS], edgecolor="black", label=PASS),
        Patch(facecolor=VERDICT_COLOURS[FAIL], edgecolor="black", label=FAIL),
        Patch(facecolor=OTHER_COLOUR, edgecolor="black", label=f"{DID_NOT_LEARN} / {ERROR}"),
        Line2D([], [], color="#6c757d", marker="x", ls="", label="no AUC (n/a)"),
        Line2D([], [], color="grey", ls="--", lw=0.8, label="chance (0.5)"),
        Line2D([], [], color="#e63946", ls=":", lw=0.8, label=f"FAIL below {0.5 - delta:g}"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3 if width_in < 9 else 6,
               fontsize=8, frameon=False)  # fmt: skip
    return fig


def plot_results(results: Sequence[TestResult], out_png: str | Path, delta: float = 0.1) -> None:
    """Write ``results_figure`` as a PNG (120 dpi, atomic)."""
    fig = results_figure(results, delta)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def save_report(
    results: Sequence[TestResult],
    out_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    properties: Sequence[dict[str, Any]] | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report.json`` (+ ``report.png``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"report.{k}" for k in ("md", "csv", "json", "png")}
    md = "# MIL assumption checks\n\n" + markdown_table(results)
    if properties:
        md += "\n## Property checks (no training)\n\n" + properties_markdown(properties)
    atomic_write_text(paths["md"], md)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(result_rows(results))
    atomic_write_text(paths["csv"], buf.getvalue())
    payload = {
        "config": config or {},
        "results": [r.to_dict() for r in results],
        "properties": list(properties or []),
    }
    text = json.dumps(_clean(payload), indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(paths["json"], text + "\n")
    if plot and results:
        plot_results(results, paths["png"], delta=(config or {}).get("delta", 0.1))
    else:
        paths.pop("png")
    return paths


def properties_markdown(properties: Sequence[dict[str, Any]]) -> str:
    """Violation rates per model (from ``PropertyReport.to_dict``); `!` marks a broken claim."""
    names = []
    for p in properties:
        for r in p["results"]:
            if r["name"] not in names:
                names.append(r["name"])
    lines = ["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for p in properties:
        by = {r["name"]: r for r in p["results"]}
        cells = []
        for n in names:
            r = by.get(n)
            if r is None:
                cells.append("")
            elif r["error"]:
                cells.append("error")
            elif not r["trials"]:
                cells.append("n/a")
            else:
                mark = "" if r["ok"] else " !"
                claim = " (claimed)" if r["claimed"] else ""
                cells.append(f"{r['rate']:.2f}{claim}{mark}")
        lines.append(f"| `{p['model']}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Violation rates on random bags; `!` = the model claims the property and breaks it."
    )
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    """NaN/inf → None recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
