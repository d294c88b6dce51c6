"""The ``milkit demo`` report: metrics, ROC, QC, attention vs planted tumour, assumption checks.

Writes ``OUT/report/index.html`` and ``report.md`` (same content, see ``document``) plus the
images under ``OUT/report/img/``; every image is copied or drawn into the report folder, so the
folder stands alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milkit.demo.attention import (
    TOP_FRACTION,
    TUMOUR_TILE_MIN_COVERAGE,
    TumourLocalisation,
    out_of_fold_scores,
    summarise_localisation,
    tumour_heatmap,
    tumour_localisation,
)
from milkit.evaluation.document import (
    METRICS,
    Document,
    Figure,
    Figures,
    Heading,
    Paragraph,
    Table,
    write_document,
)
from milkit.training.metrics import format_number

N_HEATMAPS = 3  # tumour slides drawn (plus one normal slide for contrast)
N_QC = 4


@dataclass
class BuiltReport:
    index_html: Path
    report_md: Path
    localisation: Mapping[str, float]
    per_slide: list[TumourLocalisation]
    score_kind: str = "attention"  # or "instance score" for models without attention


def metrics_table(folds: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> Table:
    """Per-fold test metrics plus a bold mean ± std row."""
    rows = []
    for m in folds:
        rows.append(
            [
                f"fold {m.get('fold')}",
                str(m.get("n", "")),
                *(format_number(m.get(k)) for k, _ in METRICS),
            ]
        )
    mean_std = []
    for key, _ in METRICS:
        s = summary.get(key, {})
        mean_std.append(f"{format_number(s.get('mean'))} ± {format_number(s.get('std'))}")
    rows.append(["mean ± std", str(sum(int(m.get("n", 0) or 0) for m in folds)), *mean_std])
    return Table(
        ["", "test slides", *(label for _, label in METRICS)],
        rows,
        emph_rows=frozenset({len(rows) - 1}),
    )


def pooled_roc(run_dir: Path, folds: Sequence[int], class_names: Sequence[str], out_png: Path):
    """ROC of the out-of-fold predictions of every fold pooled; None when one class is absent."""
    from milkit.io.runs import read_fold_predictions
    from milkit.training.metrics import plot_roc

    parts = [(y, p) for k, y, p in read_fold_predictions(run_dir, class_names) if k in set(folds)]
    if not parts:
        return None
    y = np.concatenate([y for y, _ in parts])
    probs = np.concatenate([p for _, p in parts])
    if len(np.unique(y)) < 2:
        return None
    return plot_roc(y, probs, class_names, out_png, title="Pooled out-of-fold ROC")


def _tumour_coverage(slide_path: str, bag_path: str) -> np.ndarray:
    from milkit.feature_extraction.synthetic import load_synthetic_masks, tumour_fraction_of_tiles
    from milkit.io.bags import read_bag

    bag = read_bag(bag_path)
    masks = load_synthetic_masks(slide_path)
    ps = float(bag.coords_attrs["patch_size_level0"])
    return tumour_fraction_of_tiles(masks, bag.coords, ps)


def _slide_paths(out_dir: Path) -> dict[str, str]:
    import pandas as pd

    cohort = pd.read_csv(out_dir / "slides" / "labels.csv")
    return {
        str(s): str(out_dir / "slides" / Path(p).name)
        for s, p in zip(cohort["slide_id"], cohort["slide_path"], strict=True)
    }


def attention_section(
    out_dir: Path, table: Any, cv: Any, img_dir: Path, positive: str
) -> tuple[list, list[TumourLocalisation], list[str], str]:
    """Out-of-fold attention vs planted tumour, and heatmaps.

    Returns (blocks, per-slide localisation, slide ids drawn, score kind)."""
    frame = table.frame
    tile_scores = out_of_fold_scores(
        cv.out_dir, table, cv.splits, positive_index=list(table.class_names).index(positive)
    )
    attention, what = tile_scores.scores, tile_scores.kind
    blocks: list = [Heading("Where the model looks")]
    if what != "attention":
        blocks.append(
            Paragraph(
                f"This model has no attention; its per-tile {positive!r} probabilities "
                "(instance scores) are shown and measured instead, with 'attention' below "
                "meaning the tile's share of the summed instance scores."
            )
        )
    paths = _slide_paths(out_dir)
    bag_of = dict(zip(frame["slide_id"], frame["bag_path"], strict=True))
    label_of = dict(zip(frame["slide_id"], frame["label"], strict=True))
    per_slide: list[TumourLocalisation] = []
    for sid, att in attention.items():
        if label_of.get(sid) == positive:
            cov = _tumour_coverage(paths[sid], bag_of[sid])
            per_slide.append(tumour_localisation(sid, att, cov))
    summary = summarise_localisation(per_slide)
    if summary.get("slides"):
        blocks.append(
            Paragraph(
                f"Each slide's attention comes from the model of the fold in which the slide was a "
                f"test slide (out of fold). A tile counts as tumour when the planted tumour covers at "
                f"least {TUMOUR_TILE_MIN_COVERAGE:.0%} of it. Over {summary['slides']} tumour slides, "
                f"{summary['top_hit_rate']:.0%} of the top-{TOP_FRACTION:.0%} attention tiles are "
                f"tumour tiles, against {summary['chance']:.0%} by chance "
                f"({summary['enrichment']:.1f}× enrichment); tumour tiles hold "
                f"{summary['attention_mass']:.0%} of the attention. The best possible hit rate is "
                f"{summary['best_possible']:.0%}: most slides have fewer tumour tiles than a "
                "tenth of their tiles."
            )
        )
        rows = [
            [
                t.slide_id,
                str(t.n_tiles),
                str(t.n_tumour_tiles),
                f"{t.top_hit_rate:.0%}",
                f"{t.best_possible:.0%}",
                f"{t.chance:.0%}",
                format_number(t.enrichment, 1),
                f"{t.attention_mass:.0%}",
            ]
            for t in sorted(per_slide, key=lambda t: t.slide_id)
        ]
        blocks.append(
            Table(
                [
                    "slide",
                    "tiles",
                    "tumour tiles",
                    "top-decile hit rate",
                    "best possible",
                    "chance",
                    "enrichment",
                    "attention on tumour",
                ],
                rows,
            )
        )
    ranked = sorted(
        (t for t in per_slide if t.n_tumour_tiles > 0),
        key=lambda t: (-t.n_tumour_tiles, t.slide_id),
    )
    shown = [t.slide_id for t in ranked[:N_HEATMAPS]]
    normal = sorted(s for s in attention if label_of.get(s) != positive)
    shown += normal[:1]
    figs = []
    for sid in shown:
        png = img_dir / f"heatmap_{sid}.png"
        kind = "tumour" if label_of.get(sid) == positive else "normal"
        tumour_heatmap(
            paths[sid],
            bag_of[sid],
            attention[sid],
            png,
            title=f"{sid} ({kind}): out-of-fold {what}, log scale",
            label="log10(attn)" if what == "attention" else "log10(score)",
        )
        caption = (
            (
                f"{sid} ({kind} slide): {what} per tile, log scale from 1e-8 (blue) to 1 "
                "(red); the white/black line outlines the planted tumour"
            )
            if kind == "tumour"
            else (
                f"{sid} (normal slide, for contrast): {what} per tile, log scale, without "
                "a tumour to find"
            )
        )
        figs.append(Figure(f"img/{png.name}", caption, wide=True))  # readable: full width
    if figs:
        blocks.append(Figures(figs))
    return blocks, per_slide, shown, what


def _property_result(p: Mapping) -> str:
    if p.get("error"):
        return "ERROR"
    if not p.get("claimed"):
        return "not claimed"
    return "PASS" if p.get("ok") else "FAIL"


def checks_section(tests: Sequence[Mapping], props: Sequence[Mapping], model: str) -> list:
    blocks: list = [Heading("MIL assumption checks")]
    if not tests and not props:
        blocks.append(
            Paragraph(
                f"Skipped (--no-check). Run `milkit check --model {model}` for the full checks."
            )
        )
        return blocks
    blocks.append(
        Paragraph(
            "Algorithmic unit tests (Raff & Holt, NeurIPS 2023): each synthetic task has a training "
            "shortcut that breaks the MIL assumption and a test set where the shortcut ranks bags "
            "below chance. FAIL = the model learned the shortcut (test AUC < 0.4 or its CI below "
            "0.5); DID NOT LEARN = it did not fit the training draw. Demo-sized (1 seed, 150 bags); "
            f"run `milkit check --model {model}` for the full protocol."
        )
    )
    rows = [
        [
            str(t.get("test")),
            str(t.get("verdict")),
            format_number(t.get("train_auc")),
            f"{format_number(t.get('test_auc'))} [{format_number(t.get('ci_low'))}, {format_number(t.get('ci_high'))}]",
            str(t.get("error") or ""),
        ]
        for t in tests
    ]
    blocks.append(Table(["test", "verdict", "train AUC", "test AUC [95% CI]", "error"], rows))
    if props:
        rows = [
            [
                str(p["property"]),
                "yes" if p["claimed"] else "no",
                f"{p['violations']}/{p['trials']}",
                _property_result(p),
                str(p.get("error") or ""),
            ]
            for p in props
        ]
        blocks.append(
            Paragraph(
                "Structural properties on random bags (a violation of a "
                "property the model does not claim is information, not a bug):",
                note=True,
            )
        )
        blocks.append(Table(["property", "claimed", "violations", "result", "error"], rows))
    return blocks


def build_report(
    out_dir: str | Path,
    *,
    table: Any,
    cv: Any,
    model: str,
    tests: Sequence[Mapping] = (),
    properties: Sequence[Mapping] = (),
    failed_slides: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
    stage_seconds: Mapping[str, float] | None = None,
) -> BuiltReport:
    """Write ``OUT/report/`` for a finished demo run (``cv`` is a ``milkit.training.cv.CVResult``)."""
    out_dir = Path(out_dir)
    report_dir = out_dir / "report"
    img_dir = report_dir / "img"
    if img_dir.is_dir():
        shutil.rmtree(img_dir)  # no stale images from an earlier run with other slides
    img_dir.mkdir(parents=True)
    class_names = [str(c) for c in table.class_names]
    positive = "tumour" if "tumour" in class_names else class_names[-1]
    settings = dict(settings or {})

    doc = Document(f"milkit demo: {model} on a synthetic cohort")
    doc.add(
        Paragraph(
            f"{len(table)} synthetic slides ({', '.join(f'{(table.frame.label == c).sum()} {c}' for c in class_names)}); "
            f"tumour slides carry planted tumour regions covering "
            f"{settings.get('tumour_fraction', float('nan')):.0%} of the tissue. Features: "
            f"`{settings.get('encoder', 'fast')}` encoder; model: `{model}`; "
            f"{len(cv.folds)}-fold cross-validation grouped by case, early stopping on an inner "
            "validation split, each test fold predicted once with the selected checkpoint."
        )
    )
    doc.add(Heading("Test metrics"), metrics_table(cv.folds, cv.summary))
    roc = pooled_roc(
        cv.out_dir, [m.get("fold") for m in cv.folds], class_names, img_dir / "roc.png"
    )
    if roc is not None:
        doc.add(
            Figures(
                [
                    Figure(
                        "img/roc.png",
                        "ROC of all out-of-fold test predictions pooled "
                        "(per-fold curves: `run/fold_<k>/roc.png`)",
                        width=420,
                    )
                ]
            )
        )

    att_blocks, per_slide, shown, what = attention_section(out_dir, table, cv, img_dir, positive)
    doc.add(*att_blocks)

    qc_src = out_dir / "bags" / "qc"
    qc_ids = [s for s in shown if (qc_src / f"{s}.png").is_file()][:N_QC]
    if qc_ids:
        figs = []
        for sid in qc_ids:
            shutil.copyfile(qc_src / f"{sid}.png", img_dir / f"qc_{sid}.png")
            figs.append(
                Figure(
                    f"img/qc_{sid}.png",
                    f"{sid}: tissue outline (green, holes blue) and the tiles kept (red)",
                    wide=True,  # its header text is 1/60 of the image: readable only when large
                )
            )
        doc.add(Heading("Preprocessing QC"), Figures(figs))
    if failed_slides:
        doc.add(
            Paragraph("Slides left out of training (details in `bags/manifest.csv`):"),
            Table(["slide", "reason"], [[k, v] for k, v in failed_slides.items()]),
        )

    doc.add(*checks_section(tests, properties, model))
    check_png = out_dir / "check" / "report.png"
    if tests and check_png.is_file():
        shutil.copyfile(check_png, img_dir / "checks.png")
        caption = "Test AUC per assumption test (full report: `check/report.md`)"
        doc.add(Figures([Figure("img/checks.png", caption, wide=True)]))

    doc.add(Heading("Files"))
    doc.add(
        Paragraph(
            "`slides/` synthetic slides, masks and labels.csv · `bags/` features "
            "(`<slide_id>.h5`), QC and manifest.csv · `run/` splits, checkpoints, "
            "predictions and metrics per fold, summary.csv · `check/` assumption-check "
            "report (as `milkit check` writes it) · `report/summary.json` every number of this page."
        )
    )
    if stage_seconds:
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
        doc.add(Paragraph(f"Time per stage: {timing}. Settings: {settings}.", note=True))
    index, md = write_document(doc, report_dir)
    return BuiltReport(index, md, summarise_localisation(per_slide), per_slide, what)


__all__ = ["BuiltReport", "build_report", "metrics_table", "pooled_roc"]
