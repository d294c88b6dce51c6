"""``milkit report``: an HTML + Markdown report of any ``milkit train`` run.

Reads the run folder as ``milkit evaluate`` does (``run.json``, ``fold_<k>/predictions.csv``: each
test fold predicted once by that fold's selected checkpoint) and writes ``index.html`` and
``report.md`` (one document model, ``milkit.evaluation.document``) with the images under ``img/``:

- per-fold test metrics with percentile-bootstrap 95% CIs, and the same metrics on all
  out-of-fold predictions pooled;
- the pooled ROC, confusion matrix and reliability (calibration) diagram
  (``sklearn.calibration.calibration_curve``), Brier score;
- the predictions table (also ``predictions.csv`` in the report folder);
- with ``slides_dir``: for selected slides, the out-of-fold attention heatmap on the slide and the
  top-k attended tiles cut from the slide.

Figures are drawn on matplotlib ``Figure`` objects with their own Agg canvas (never pyplot).
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milkit.errors import MilkitError
from milkit.evaluation.attention_export import TILE_PX, save_top_tiles
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
from milkit.io.atomic import atomic_path
from milkit.io.runs import BEST_CHECKPOINT, PREDICTIONS_FILE, fold_dir
from milkit.training.metrics import format_number


@dataclass
class RunPredictions:
    """Out-of-fold predictions of a run: one row per test slide, with its ``fold``."""

    info: dict[str, Any]
    class_names: list[str]
    frame: pd.DataFrame  # slide_id, fold, label, pred, prob_<class>...

    @property
    def y(self) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.class_names)}
        return self.frame["label"].map(index).to_numpy(dtype=np.int64)

    @property
    def probs(self) -> np.ndarray:
        return self.frame[[f"prob_{c}" for c in self.class_names]].to_numpy(dtype=np.float64)


@dataclass
class RunReport:
    """Paths written and the numbers shown (``pooled``: metric -> (value, ci_low, ci_high))."""

    index_html: Path
    report_md: Path
    pooled: dict[str, tuple[float, float, float]]
    folds: list[dict[str, Any]]
    images: list[Path]
    slides_drawn: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading
def read_run_predictions(run_dir: str | Path) -> RunPredictions:
    """All ``fold_<k>/predictions.csv`` of a run, checked against ``run.json``'s classes.

    Raises:
        MilkitError: not a run folder, no predictions yet, missing columns, unknown labels, or a
            slide tested in two folds.
    """
    from milkit.io.runs import load_run, read_predictions

    run_dir = Path(run_dir)
    info = load_run(run_dir)
    names = [str(c) for c in info["class_names"]]
    frame = read_predictions(run_dir, names)
    if frame.empty:
        raise MilkitError(
            "run has no test predictions (fold_<k>/predictions.csv)",
            path=run_dir,
            hint="Finish training first: milkit train ... --resume",
        )
    dup = frame["slide_id"][frame["slide_id"].duplicated()]
    if len(dup):
        raise MilkitError(
            "a slide is a test slide of more than one fold; pooled metrics would count it twice",
            value=sorted(set(dup))[:5],
            path=run_dir,
        )
    return RunPredictions(info, names, frame)


def _unfinished_folds(run_dir: Path, preds: RunPredictions) -> list[int]:
    """Folds of the run's ``splits.csv`` (with test slides) that have no predictions yet."""
    from milkit.data.splits import load_splits
    from milkit.io.runs import SPLITS_FILE

    if not (run_dir / SPLITS_FILE).is_file():
        return []
    planned = {s.fold for s in load_splits(run_dir / SPLITS_FILE) if s.test}
    return sorted(planned - {int(f) for f in preds.frame["fold"]})


# ---------------------------------------------------------------------------- numbers
def _with_ci(value: float, low: float, high: float) -> str:
    if not math.isfinite(low):
        return format_number(value)
    return f"{format_number(value)} [{format_number(low)}, {format_number(high)}]"


def metrics_with_ci(
    y: np.ndarray, probs: np.ndarray, names: Sequence[str], *, n_boot: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """Metric -> (value, 95% CI low, high); CIs NaN when ``n_boot`` is 0."""
    from milkit.training.metrics import bootstrap_ci, classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class present: AUC n/a, shown as such
        values = classification_metrics(y, probs, names)
        out = {}
        for key, _ in METRICS:
            low, high = (
                bootstrap_ci(y, probs, key, n_boot=n_boot, seed=seed)
                if n_boot > 0
                else (math.nan, math.nan)
            )
            out[key] = (float(values[key]), float(low), float(high))
    return out


def brier_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: mean (p_positive − y)²; multi-class: mean over slides of Σ_c (p_c − 1[y = c])²."""
    onehot = np.eye(probs.shape[1])[y]
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, 1] - onehot[:, 1]) ** 2))
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


# ---------------------------------------------------------------------------- figures
def _figure(width_px: int, height_px: int) -> Any:
    from milkit.io.figures import new_figure

    return new_figure(width_px, height_px)


def _save(fig: Any, path: Path) -> Path:
    from milkit.io.figures import save_figure

    return save_figure(fig, path)


def plot_confusion(cm: np.ndarray, names: Sequence[str], out_png: Path) -> Path:
    """Counts per (true, predicted) class, shaded by the row share (recall)."""
    from milkit.io.figures import points

    size = max(420, 90 * len(names) + 200)
    fig = _figure(size, size)
    ax = fig.add_axes((0.22, 0.2, 0.72, 0.68))
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    font = points(15)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]}\n({share[i, j]:.0%})", ha="center", va="center",
                    color=colour, fontsize=font)  # fmt: skip
    ax.set_xticks(range(len(names)), labels=names, fontsize=font, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), labels=names, fontsize=font)
    ax.set_xlabel("predicted class", fontsize=font)
    ax.set_ylabel("true class", fontsize=font)
    ax.set_title("Confusion matrix (pooled, arg-max)", fontsize=points(17))
    return _save(fig, out_png)


def plot_calibration(
    y: np.ndarray, probs: np.ndarray, names: Sequence[str], out_png: Path
) -> tuple[Path, int]:
    """Reliability diagram: observed frequency vs mean predicted probability per bin (quantile
    bins, ``sklearn.calibration.calibration_curve``), with the count of slides per probability
    below. Binary tasks show the positive class, multi-class tasks each class one-vs-rest.
    Returns the PNG and the number of bins."""
    from sklearn.calibration import calibration_curve

    from milkit.io.figures import points

    n_bins = int(max(2, min(10, len(y) // 5)))
    fig = _figure(560, 640)
    ax = fig.add_axes((0.15, 0.36, 0.8, 0.56))
    hist = fig.add_axes((0.15, 0.08, 0.8, 0.18))
    font = points(14)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    classes = [1] if len(names) == 2 else list(range(len(names)))
    for k in classes:
        positive = y == k
        if positive.all() or not positive.any():
            continue
        frac, mean_pred = calibration_curve(
            positive, probs[:, k], n_bins=n_bins, strategy="quantile"
        )
        ax.plot(mean_pred, frac, marker="o", linewidth=2, label=names[k])
        hist.hist(probs[:, k], bins=20, range=(0, 1), alpha=0.6, label=names[k])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean predicted probability", fontsize=font)
    ax.set_ylabel("fraction of slides of that class", fontsize=font)
    ax.set_title(f"Calibration (pooled, {n_bins} quantile bins)", fontsize=points(17))
    ax.legend(loc="upper left", fontsize=font)
    ax.tick_params(labelsize=font)
    hist.set_xlim(0, 1)
    hist.set_xlabel("predicted probability", fontsize=font)
    hist.set_ylabel("slides", fontsize=font)
    hist.tick_params(labelsize=font)
    return _save(fig, out_png), n_bins


# ---------------------------------------------------------------------------- attention
def _select_slides(preds: RunPredictions, available: set[str], max_slides: int) -> list[str]:
    """Misclassified slides first (most confident first), then the most confident correct ones,
    taking the true classes in turn."""
    frame = preds.frame.assign(
        _y=preds.y, _conf=preds.probs.max(axis=1), _pred=preds.probs.argmax(axis=1)
    )
    frame = frame[frame["slide_id"].isin(available)]
    wrong = frame[frame["_y"] != frame["_pred"]].sort_values(["_conf", "slide_id"],
                                                             ascending=[False, True])  # fmt: skip
    chosen = list(wrong["slide_id"])[:max_slides]
    right = frame[frame["_y"] == frame["_pred"]].sort_values(["_conf", "slide_id"],
                                                             ascending=[False, True])  # fmt: skip
    queues = [list(g["slide_id"]) for _, g in right.groupby("_y", sort=True)]
    while len(chosen) < max_slides and any(queues):
        for q in queues:
            if q and len(chosen) < max_slides:
                chosen.append(q.pop(0))
    return chosen


def out_of_fold_attention(
    run_dir: Path,
    preds: RunPredictions,
    slide_ids: Sequence[str],
    bag_paths: Mapping[str, Path],
    *,
    device: str = "auto",
) -> tuple[str, dict[str, np.ndarray]]:
    """Per-tile scores of ``slide_ids`` from the checkpoint of the fold that tested each slide.

    Returns ``(kind, scores)``: ``"attention"`` (mean over heads, sums to 1 per slide) or, for
    models without attention, ``"instance score"`` (positive-class probability per tile, as in
    the demo report).
    """
    from milkit.data.datasets import BagDataset
    from milkit.runtime.device import resolve_device
    from milkit.training.inference import instance_scores, load_checkpoint
    from milkit.training.trainer import predict

    device = str(resolve_device(device))
    fold_of = dict(zip(preds.frame["slide_id"], preds.frame["fold"], strict=True))
    kind = "attention"
    out: dict[str, np.ndarray] = {}
    for fold in sorted({int(fold_of[s]) for s in slide_ids}):
        ids = [s for s in slide_ids if int(fold_of[s]) == fold]
        ckpt = fold_dir(run_dir, fold) / BEST_CHECKPOINT
        if not ckpt.is_file():
            raise MilkitError("fold has predictions but no selected checkpoint", path=ckpt)
        model, _ = load_checkpoint(ckpt, map_location=device)
        dataset = BagDataset([bag_paths[s] for s in ids], None, ids)
        result = predict(model, dataset, device=device, with_attention=True)
        if result.attention is None:
            kind = "instance score"
            # instance_scores runs on the CPU (as the demo's report does)
            out.update(instance_scores(model.cpu(), dataset, len(preds.class_names) - 1))
            continue
        for sid, att in zip(result.slide_ids, result.attention, strict=True):
            out[str(sid)] = np.asarray(att.mean(axis=0) if att.ndim == 2 else att, dtype=np.float64)
    return kind, out


# ---------------------------------------------------------------------------- the document
def _fold_table(per_fold: list[dict[str, Any]], with_ci: bool) -> Table:
    from milkit.training.metrics import summarise_folds

    rows = []
    for m in per_fold:
        rows.append(
            [f"fold {m['fold']}", str(m["n"]), *(_with_ci(*m["ci"][k]) for k, _ in METRICS)]
        )
    summary = summarise_folds([{k: m["ci"][k][0] for k, _ in METRICS} for m in per_fold])
    rows.append(
        [
            "mean ± std",
            str(sum(m["n"] for m in per_fold)),
            *(
                f"{format_number(summary[k]['mean'])} ± {format_number(summary[k]['std'])}"
                for k, _ in METRICS
            ),
        ]
    )
    return Table(
        ["", "test slides", *(f"{label} [95% CI]" if with_ci else label for _, label in METRICS)],
        rows,
        emph_rows=frozenset({len(rows) - 1}),
    )


def build_run_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    slides_dir: str | Path | None = None,
    bags_dir: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    top_k: int = 8,
    max_slides: int = 12,
    slide_ids: Sequence[str] | None = None,
    device: str = "auto",
    thumbnail_size: int = 1600,
) -> RunReport:
    """Write the report of a run to ``out_dir`` (default ``RUN/report``).

    Args:
        run_dir: a ``milkit train --out`` folder.
        out_dir: report folder (``index.html``, ``report.md``, ``predictions.csv``, ``img/``).
        slides_dir: slides of the run's bags (searched recursively); adds heatmaps and top tiles.
        bags_dir: where the bags are now (default: ``run.json``'s ``bags_dir``).
        bootstrap: resamples for the 95% CIs (0: no CIs).
        top_k: tiles shown per slide; max_slides: slides drawn (``slide_ids`` picks them).
        device: for the attention pass (``auto``: CUDA when available).

    Raises:
        MilkitError: not a run / no predictions (see ``read_run_predictions``); ``slide_ids``
            that are not test slides of the run. Per-slide drawing problems become notes.
    """
    run_dir = Path(run_dir)
    preds = read_run_predictions(run_dir)
    info = preds.info
    names = preds.class_names
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    img_dir = out_dir / "img"
    if img_dir.is_dir():
        shutil.rmtree(img_dir)  # no stale images from an earlier report
    img_dir.mkdir(parents=True)
    notes: list[str] = []
    images: list[Path] = []
    missing = _unfinished_folds(run_dir, preds)
    if missing:
        notes.append(
            f"fold(s) {missing} have no test predictions yet: the numbers cover the finished "
            "folds only. Finish them with `milkit train ... --resume`"
        )

    y, probs = preds.y, preds.probs
    per_fold = []
    for fold, part in preds.frame.groupby("fold", sort=True):
        mask = (preds.frame["fold"] == fold).to_numpy()
        ci = metrics_with_ci(y[mask], probs[mask], names, n_boot=bootstrap, seed=seed)
        per_fold.append({"fold": int(fold), "n": len(part), "ci": ci})
    pooled = metrics_with_ci(y, probs, names, n_boot=bootstrap, seed=seed)

    model = info.get("model_name", "?")
    doc = Document(f"milkit run report: {model} ({run_dir.name})")
    counts = ", ".join(f"{int((y == i).sum())} {n}" for i, n in enumerate(names))
    cfg = info.get("train_config", {})
    doc.add(
        Paragraph(
            f"Run `{run_dir}`: model `{model}` {info.get('model_kwargs') or ''}, classes "
            f"{', '.join(names)}; {len(preds.frame)} test slides ({counts}) in {len(per_fold)} "
            f"fold(s). Training: {cfg.get('epochs', '?')} epochs, {cfg.get('optimizer', '?')} "
            f"lr {cfg.get('lr', '?')}, monitor {cfg.get('monitor', '?')}. Every slide is scored "
            "once, by the checkpoint selected in the fold where it was a test slide."
        )
    )
    ci_text = (
        f"95% CIs: percentile bootstrap over slides ({bootstrap} resamples, seed {seed})."
        if bootstrap > 0
        else "No CIs (--bootstrap 0)."
    )
    doc.add(
        Heading("Test metrics per fold"),
        _fold_table(per_fold, bootstrap > 0),
        Paragraph(ci_text, note=True),
    )
    doc.add(
        Heading("Pooled out-of-fold metrics"),
        Table(
            ["metric", "value", "95% CI"],
            [
                [
                    label,
                    format_number(pooled[k][0]),
                    f"[{format_number(pooled[k][1])}, {format_number(pooled[k][2])}]"
                    if math.isfinite(pooled[k][1])
                    else "n/a",
                ]
                for k, label in METRICS
            ]
            + [["Brier score", format_number(brier_score(y, probs)), ""]],
        ),
    )

    # figures: ROC, confusion matrix, calibration
    from milkit.training.metrics import classification_metrics, plot_roc

    figs = []
    if len(np.unique(y)) > 1:
        roc = plot_roc(y, probs, names, img_dir / "roc.png", title="Pooled out-of-fold ROC")
        images.append(roc)
        figs.append(Figure("img/roc.png", "ROC of all out-of-fold predictions pooled"))
    else:
        notes.append("only one class among the test slides: no ROC")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = np.asarray(classification_metrics(y, probs, names)["confusion_matrix"])
    images.append(plot_confusion(cm, names, img_dir / "confusion.png"))
    figs.append(Figure("img/confusion.png", "Confusion matrix: count (share of the true class)"))
    if len(np.unique(y)) > 1:
        cal, n_bins = plot_calibration(y, probs, names, img_dir / "calibration.png")
        images.append(cal)
        figs.append(
            Figure(
                "img/calibration.png",
                f"Reliability diagram ({n_bins} quantile bins) and predicted-probability counts",
            )
        )
    doc.add(Heading("ROC, confusion matrix, calibration"), Figures(figs))
    doc.add(
        Table(
            ["true \\ predicted", *names],
            [[names[i], *(str(int(v)) for v in cm[i])] for i in range(len(names))],
        )
    )

    # predictions table
    table = preds.frame[["slide_id", "fold", "label", *[f"prob_{c}" for c in names]]].copy()
    table.insert(3, "predicted", [names[i] for i in probs.argmax(axis=1)])
    table = table.sort_values(["fold", "slide_id"]).reset_index(drop=True)
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
        table.to_csv(tmp, index=False)
    rows = [
        [
            str(r.slide_id),
            str(r.fold),
            str(r.label),
            str(r.predicted),
            *(format_number(getattr(r, f"prob_{c}")) for c in names),
            "yes" if r.label == r.predicted else "NO",
        ]
        for r in table.itertuples(index=False)
    ]
    doc.add(
        Heading("Predictions"),
        Paragraph(
            "Out-of-fold class probabilities of every test slide (`predictions.csv` in this "
            "folder); the predicted class is the arg-max."
        ),
        Table(
            ["slide", "fold", "label", "predicted", *(f"p({c})" for c in names), "correct"], rows
        ),
    )

    drawn: list[str] = []
    if slides_dir is not None:
        drawn = _attention_section(
            doc, run_dir, preds, info, Path(slides_dir), bags_dir, img_dir, images, notes,
            top_k=top_k, max_slides=max_slides, slide_ids=slide_ids, device=device,
            thumbnail_size=thumbnail_size,
        )  # fmt: skip
    else:
        doc.add(
            Paragraph(
                "Heatmaps and top attended tiles: run `milkit report --run RUN --slides DIR` "
                "with the folder of the slides.",
                note=True,
            )
        )
    if notes:
        doc.add(Heading("Notes"), *(Paragraph(n, note=True) for n in notes))
    index, md = write_document(doc, out_dir)
    return RunReport(index, md, pooled, per_fold, images, drawn, notes)


def _attention_section(
    doc: Document,
    run_dir: Path,
    preds: RunPredictions,
    info: Mapping[str, Any],
    slides_dir: Path,
    bags_dir: str | Path | None,
    img_dir: Path,
    images: list[Path],
    notes: list[str],
    *,
    top_k: int,
    max_slides: int,
    slide_ids: Sequence[str] | None,
    device: str,
    thumbnail_size: int,
) -> list[str]:
    from milkit.evaluation.heatmap import heatmap_for_slide
    from milkit.feature_extraction.batch import discover_slides, slide_id_of
    from milkit.io.bags import find_bag

    bags_root = Path(bags_dir) if bags_dir is not None else Path(str(info.get("bags_dir", "")))
    if not bags_root.is_dir():
        raise MilkitError(
            "bags folder of the run not found", path=bags_root, hint="Pass --bags DIR"
        )
    from milkit.io.bag_folders import resolve_bag_folder

    bags_root = resolve_bag_folder(bags_root).path  # a TRIDENT/CLAM tree named in run.json
    slides = {slide_id_of(p): p for p in discover_slides([slides_dir])}
    tested = set(preds.frame["slide_id"])
    bag_paths = {s: find_bag(bags_root, s) for s in tested}
    available = {s for s in tested if s in slides and bag_paths[s] is not None}
    if slide_ids:
        unknown = sorted(set(slide_ids) - tested)
        if unknown:
            raise MilkitError("not test slides of this run", value=unknown[:5], path=run_dir)
        lacking = sorted(set(slide_ids) - available)
        if lacking:
            raise MilkitError(
                "no slide file or bag for slide(s)", value=lacking[:5], path=slides_dir
            )
        chosen = list(slide_ids)
    else:
        chosen = _select_slides(preds, available, max_slides)
    doc.add(Heading("Where the model looks"))
    if not chosen:
        if max_slides > 0:
            notes.append(f"no test slide of the run has both a slide in {slides_dir} and a bag")
        return []
    kind, scores = out_of_fold_attention(
        run_dir,
        preds,
        chosen,
        {s: bag_paths[s] for s in chosen},
        device=device,  # type: ignore[misc]
    )
    doc.add(
        Paragraph(
            f"{len(chosen)} slide(s): misclassified ones first, then the most confident correct "
            f"ones per class. Each heatmap shows the out-of-fold {kind} per tile (the checkpoint "
            "of the fold that tested the slide) as its percentile among the slide's tiles (CLAM's "
            f"scaling); below it the top {top_k} tiles, "
            "cut from the slide at their level-0 coordinates."
        )
    )
    row = preds.frame.set_index("slide_id")
    tiles_dir = img_dir / "tiles"
    drawn = []
    for sid in chosen:
        r = row.loc[sid]
        pred = preds.class_names[int(np.argmax([r[f"prob_{c}"] for c in preds.class_names]))]
        title = f"{sid}: true {r['label']}, predicted {pred} (fold {int(r['fold'])})"
        doc.add(Heading(title, level=3))
        png = img_dir / f"heatmap_{sid}.png"
        try:
            local: list[str] = []
            heatmap_for_slide(slides[sid], bag_paths[sid], scores[sid], png,
                              thumbnail_size=thumbnail_size, title=title, label=kind,
                              normalize="rank", notes=local)  # fmt: skip
            tiles = save_top_tiles(slides[sid], bag_paths[sid], scores[sid], top_k, tiles_dir, sid)  # type: ignore[arg-type]
        except (MilkitError, OSError, ValueError) as err:
            notes.append(f"{sid}: not drawn ({err})")
            doc.add(Paragraph(f"Not drawn: {err}", note=True))
            continue
        notes.extend(local)
        images.append(png)
        doc.add(Figures([Figure(f"img/{png.name}", f"{sid}: {kind} per tile", 900)]))
        doc.add(
            Figures(
                [
                    Figure(
                        f"img/tiles/{p.name}",
                        f"#{rank}: {kind} {score:.3g} at ({x}, {y})",
                        TILE_PX,
                    )
                    for p, rank, score, (x, y) in tiles
                ]
            )
        )
        images.extend(p for p, *_ in tiles)
        drawn.append(sid)
    return drawn


__all__ = [
    "RunPredictions",
    "RunReport",
    "brier_score",
    "build_run_report",
    "metrics_with_ci",
    "out_of_fold_attention",
    "plot_calibration",
    "plot_confusion",
    "read_run_predictions",
]
