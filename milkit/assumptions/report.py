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
from milkit.assumptions.runner import FAIL, PASS, TestResult
from milkit.atomic import atomic_path, atomic_write_text

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


def _cell(r: TestResult) -> str:
    return (
        f"{_fmt(r.train_auc)} / {_fmt(r.test_auc)} "
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
    lines.append("Cells: mean train AUC / mean test AUC [bootstrap 95% CI] verdict, over seeds.")
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


def plot_results(results: Sequence[TestResult], out_png: str | Path, delta: float = 0.1) -> None:
    """Grouped bars of mean test AUC with CI whiskers per model and test; chance and FAIL lines."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    models, tests, cells = _grid(results)
    fig = Figure(figsize=(max(6.0, 0.9 * len(models) * len(tests) ** 0.5 + 3), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(tests), 1)
    colours = {PASS: "#2a9d8f", FAIL: "#e63946"}
    for j, t in enumerate(tests):
        xs, ys, lo, hi, cs = [], [], [], [], []
        for i, m in enumerate(models):
            r = cells.get((m, t))
            if r is None or not math.isfinite(r.test_auc):
                continue
            xs.append(i + (j - (len(tests) - 1) / 2) * width)
            ys.append(r.test_auc)
            lo.append(max(r.test_auc - r.ci_low, 0) if math.isfinite(r.ci_low) else 0)
            hi.append(max(r.ci_high - r.test_auc, 0) if math.isfinite(r.ci_high) else 0)
            cs.append(colours.get(r.verdict, "#adb5bd"))
        bars = ax.bar(xs, ys, width * 0.9, color=cs, edgecolor="black", linewidth=0.4)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=0.8)
        for x, bar in zip(xs, bars):
            ax.text(x, bar.get_height() + 0.02, t.upper(), ha="center", fontsize=6)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="chance")
    ax.axhline(0.5 - delta, color="#e63946", ls=":", lw=0.8, label="FAIL below")
    ax.set_xticks(np.arange(len(models)))
    ax.set_xticklabels(models, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test AUC (shifted draw)")
    ax.set_title("MIL assumption checks (green PASS, red FAIL, grey DID NOT LEARN / ERROR)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
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
