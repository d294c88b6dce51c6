"""The run folder: the one place that knows its layout (docs/architecture.md §5).

A run folder (``milkit train --out RUN``)::

    RUN/run.json                  what was trained on what (``load_run``)
    RUN/splits.csv                the folds (``milkit.data.splits``)
    RUN/summary.json, summary.csv per-fold and pooled test metrics
    RUN/fold_<k>/best.pt          the selected checkpoint of fold k
    RUN/fold_<k>/last.pt          training state for ``--resume``
    RUN/fold_<k>/metrics.json     test metrics of fold k (written last: the fold is done)
    RUN/fold_<k>/predictions.csv  slide_id, label, pred, prob_<class>...

Readers and writers build these paths with the names and functions here, never by hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError

RUN_FILE = "run.json"
SPLITS_FILE = "splits.csv"
SUMMARY_FILE = "summary.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


def fold_dir(run_dir: str | Path, fold: int | str) -> Path:
    """``RUN/fold_<fold>``."""
    return Path(run_dir) / f"fold_{fold}"


def fold_number(path: str | Path) -> int:
    """k of a ``fold_<k>`` folder."""
    return int(Path(path).name[5:])


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, with a clear error when the folder is not a run."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise MilkitError(
            "not a milkit run folder (no run.json)",
            path=run_dir,
            hint="Pass the --out folder of `milkit train`",
        )
    try:
        return json.loads(run_file.read_text())
    except json.JSONDecodeError as err:
        raise MilkitError(f"run.json is not valid JSON ({err})", path=run_file) from None


def fold_dirs(run_dir: str | Path) -> list[Path]:
    """The ``fold_<k>`` folders of a run, by fold number."""
    found = [p for p in Path(run_dir).glob("fold_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=fold_number)


def fold_checkpoints(run_dir: str | Path, fold: str | int = "all") -> list[Path]:
    """``best.pt`` of one fold (``fold=k``) or of every fold (``"all"``, for an ensemble)."""
    run_dir = Path(run_dir)
    broken = [d.name for d in fold_dirs(run_dir)
              if (d / METRICS_FILE).is_file() and not (d / BEST_CHECKPOINT).is_file()]  # fmt: skip
    if broken:
        # Test metrics without a selected checkpoint: an older milkit scored the last epoch.
        raise MilkitError(
            f"fold(s) {broken} finished without a selected checkpoint (best.pt)",
            path=run_dir,
            hint="Retrain them: milkit train ... --out RUN --resume",
        )
    available = [d for d in fold_dirs(run_dir) if (d / BEST_CHECKPOINT).is_file()]
    if not available:
        raise MilkitError(
            "run has no trained fold (no fold_<k>/best.pt)",
            path=run_dir,
            hint="Finish training first: milkit train ... --resume",
        )
    if str(fold).lower() == "all":
        return [d / BEST_CHECKPOINT for d in available]
    wanted = fold_dir(run_dir, fold) / BEST_CHECKPOINT
    if not wanted.is_file():
        names = [d.name[5:] for d in available]
        raise MilkitError("no such fold in the run", value=fold, path=run_dir,
                          hint=f"Available folds: {', '.join(names)} (or 'all')")  # fmt: skip
    return [wanted]


def read_predictions(run_dir: str | Path, class_names: Sequence[str]) -> Any:
    """Every ``fold_<k>/predictions.csv`` of a run as one DataFrame with a ``fold`` column.

    Cells are read as written (``keep_default_na=False``: a slide id or class spelled ``NA``
    stays a string). Folds without the file are skipped; none at all gives an empty frame.

    Raises:
        MilkitError: a file lacks ``slide_id``/``label``/``prob_<class>`` columns, or holds a
            label outside ``class_names`` (both name the file).
    """
    import pandas as pd

    names = [str(c) for c in class_names]
    cols = [f"prob_{n}" for n in names]
    frames = []
    for d in fold_dirs(run_dir):
        path = d / PREDICTIONS_FILE
        if not path.is_file():
            continue
        frame = pd.read_csv(path, dtype={"slide_id": str, "label": str, "pred": str},
                            keep_default_na=False)  # fmt: skip
        missing = [c for c in ["slide_id", "label", *cols] if c not in frame.columns]
        if missing:
            raise MilkitError(f"predictions file lacks columns {missing}", path=path)
        unknown = sorted(set(frame["label"]) - set(names))
        if unknown:
            raise MilkitError("predictions hold labels outside the run's classes",
                              value=unknown[:5], path=path)  # fmt: skip
        frames.append(frame.assign(fold=fold_number(d)))
    if not frames:
        return pd.DataFrame(columns=["slide_id", "label", *cols, "fold"])
    return pd.concat(frames, ignore_index=True)


def read_fold_predictions(
    run_dir: str | Path, class_names: Sequence[str]
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(fold, y, probs)`` of every ``fold_<k>/predictions.csv`` of a run (labels as class
    indices, probabilities (n, C) float64); see ``read_predictions`` for the checks."""
    names = [str(c) for c in class_names]
    index = {n: i for i, n in enumerate(names)}
    frame = read_predictions(run_dir, names)
    cols = [f"prob_{n}" for n in names]
    return [
        (int(k), part["label"].map(index).to_numpy(dtype=np.int64),
         part[cols].to_numpy(dtype=np.float64))
        for k, part in frame.groupby("fold", sort=True)
    ]  # fmt: skip
