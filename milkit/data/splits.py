"""Cross-validation splits grouped by patient, with an inner validation split (docs/architecture.md §5).

Test folds come from scikit-learn's ``StratifiedGroupKFold`` over cases (``case_id``), so no
patient has slides in two folds. The validation set used for early stopping and model selection
is carved out of the training part of each fold, again grouped by case and stratified by label;
the test fold is never looked at during training. Split files (``slide_id,fold,split``) are saved
with the run and can be reused.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milkit.data.labels import SPLIT_NAMES, LabelTable
from milkit.errors import MilkitError
from milkit.io.atomic import atomic_write_text


@dataclass(frozen=True)
class FoldSplit:
    """Slide ids of one fold's training, validation and test parts."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    def part(self, name: str) -> list[str]:
        """``train``, ``val`` or ``test`` by name."""
        if name not in SPLIT_NAMES:
            raise MilkitError("split name must be train, val or test", value=name)
        return list(getattr(self, name))


def _frame(table: LabelTable | pd.DataFrame) -> pd.DataFrame:
    frame = table.frame if isinstance(table, LabelTable) else table
    missing = [c for c in ("slide_id", "label_idx") if c not in frame.columns]
    if missing:
        raise MilkitError(f"table lacks column(s) {missing}", value=list(frame.columns))
    frame = frame.reset_index(drop=True)
    if "case_id" not in frame.columns:
        frame = frame.assign(case_id=frame["slide_id"])
    return frame


def _case_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per case: the most frequent label of its slides (ties: the smallest index)."""
    return frame.groupby("case_id", sort=True)["label_idx"].agg(
        lambda s: int(s.value_counts().sort_index().idxmax())
    )


def _choose_val_cases(
    case_labels: pd.Series, val_fraction: float, rng: np.random.Generator
) -> set[str]:
    """Validation cases: about ``val_fraction`` of the cases of every class.

    A class with at least two cases puts at least one in validation (so a validation AUC can be
    computed) and keeps at least one for training.
    """
    chosen: set[str] = set()
    if val_fraction <= 0:
        return chosen
    for label in sorted(case_labels.unique()):
        cases = sorted(case_labels.index[case_labels == label])
        n = len(cases)
        if n < 2:
            continue
        k = min(n - 1, max(1, round(val_fraction * n)))
        picked = rng.choice(n, size=k, replace=False)
        chosen.update(cases[i] for i in picked)
    return chosen


def _deal_cases(
    case_labels: pd.Series, groups: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per fold: cases shuffled within each class, then dealt out to the
    folds in turn, class after class (stratified as far as the counts allow)."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    position = 0
    for label in sorted(case_labels.unique()):
        cases = sorted(case_labels.index[case_labels == label])
        for i in rng.permutation(len(cases)):
            fold_of[str(cases[i])] = position % folds
            position += 1
    assigned = np.array([fold_of[str(g)] for g in groups])
    rows = np.arange(len(groups))
    return [(rows[assigned != k], rows[assigned == k]) for k in range(folds)]


def _ordered(frame: pd.DataFrame, mask: np.ndarray) -> list[str]:
    return frame.loc[mask, "slide_id"].astype(str).tolist()


def make_cv_splits(
    table: LabelTable | pd.DataFrame, folds: int = 5, val_fraction: float = 0.15, seed: int = 0
) -> list[FoldSplit]:
    """Stratified k-fold grouped by case, with a grouped, stratified inner validation split.

    Every slide is in exactly one test fold; a case's slides are always in the same part of a
    fold; validation slides come only from the training part. Slide ids keep table order.

    Args:
        table: a ``LabelTable`` (or its frame: ``slide_id``, ``label_idx``[, ``case_id``]).
        folds: number of folds (>= 2, at most the number of cases).
        val_fraction: fraction of each fold's training cases (per class) used for validation;
            0 gives no validation set.
        seed: shuffling seed of the folds and of the validation choice.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    frame = _frame(table)
    n_cases = frame["case_id"].nunique()
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise MilkitError("folds must be an integer >= 2", value=folds)
    if folds > n_cases:
        raise MilkitError(
            f"cannot make {folds} folds from {n_cases} cases",
            value=folds,
            hint="Use fewer folds (each fold needs at least one case)",
        )
    if not 0.0 <= val_fraction < 1.0:
        raise MilkitError("val_fraction must be in [0, 1)", value=val_fraction)
    case_labels = _case_labels(frame)
    per_class = case_labels.value_counts()
    if per_class.min() < folds:
        warnings.warn(
            f"class(es) {sorted(per_class.index[per_class < folds].tolist())} have fewer cases "
            f"than folds ({folds}); some test folds will lack them and their AUC is undefined",
            stacklevel=2,
        )
    y = frame["label_idx"].to_numpy()
    groups = frame["case_id"].astype(str).to_numpy()
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits: list[FoldSplit] = []
    if per_class.max() < folds:  # StratifiedGroupKFold refuses when every class is that small
        fold_iter = _deal_cases(case_labels, groups, folds, seed)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            fold_iter = list(sgkf.split(np.zeros(len(frame)), y, groups))
    for k, (train_idx, test_idx) in enumerate(fold_iter):
        is_test = np.zeros(len(frame), dtype=bool)
        is_test[test_idx] = True
        train_cases = case_labels.loc[sorted(set(groups[train_idx]))]
        rng = np.random.default_rng((seed, k))
        val_cases = _choose_val_cases(train_cases, val_fraction, rng)
        if val_cases:
            in_val = {int(x) for x in train_cases.loc[sorted(val_cases)]}
            missing = sorted({int(x) for x in train_cases} - in_val)
            if missing:
                warnings.warn(
                    f"fold {k}: class(es) {missing} have fewer than two training cases, so the "
                    "validation set lacks them (validation AUC may be undefined)",
                    stacklevel=2,
                )
        is_val = ~is_test & np.isin(groups, list(val_cases))
        is_train = ~is_test & ~is_val
        splits.append(
            FoldSplit(
                k, _ordered(frame, is_train), _ordered(frame, is_val), _ordered(frame, is_test)
            )
        )
    return splits


def fixed_split(table: LabelTable | pd.DataFrame) -> FoldSplit:
    """The one user-given split of a table with a ``split`` column (train/val/test) as fold 0.

    A case whose slides fall in different parts is refused (patient leakage).
    """
    frame = _frame(table)
    if "split" not in frame.columns:
        raise MilkitError(
            "the labels table has no 'split' column",
            hint="Add a split column (train/val/test) or use cross-validation (--folds)",
        )
    split = frame["split"].astype(str).str.lower()
    bad = frame.loc[~split.isin(SPLIT_NAMES), "slide_id"].tolist()
    if bad:
        raise MilkitError(f"split must be train/val/test for every slide; wrong for {bad[:5]}")
    if not (split == "train").any():
        raise MilkitError("the split column names no training slides", value=sorted(set(split)))
    parts_per_case = frame.assign(split=split).groupby("case_id")["split"].nunique()
    leaking = parts_per_case.index[parts_per_case > 1].tolist()
    if leaking:
        raise MilkitError(
            f"{len(leaking)} case(s) have slides in more than one split part: {leaking[:5]}",
            hint="Put all slides of a patient in the same part (train, val or test)",
        )
    return FoldSplit(
        0,
        _ordered(frame, (split == "train").to_numpy()),
        _ordered(frame, (split == "val").to_numpy()),
        _ordered(frame, (split == "test").to_numpy()),
    )


def validate_splits(splits: Sequence[FoldSplit], table: LabelTable | pd.DataFrame) -> None:
    """Check reused splits against a table: every id known, no slide in two parts of a fold,
    no case in two parts of a fold."""
    frame = _frame(table)
    known = set(frame["slide_id"].astype(str))
    case_of = dict(zip(frame["slide_id"].astype(str), frame["case_id"].astype(str), strict=True))
    for s in splits:
        ids = s.train + s.val + s.test
        unknown = sorted(set(ids) - known)
        if unknown:
            raise MilkitError(
                f"fold {s.fold} names {len(unknown)} slide(s) not in the labels table: "
                f"{unknown[:5]}",
                hint="Use the split file made for this labels CSV",
            )
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})
            raise MilkitError(f"fold {s.fold} puts slide(s) in two parts: {dup[:5]}")
        part_cases = [{case_of[x] for x in part} for part in (s.train, s.val, s.test)]
        shared = (
            (part_cases[0] & part_cases[1])
            | (part_cases[0] & part_cases[2])
            | (part_cases[1] & part_cases[2])
        )
        if shared:
            raise MilkitError(
                f"fold {s.fold} has case(s) in more than one part: {sorted(shared)[:5]}",
                hint="Patient leakage: all slides of a case must be in the same part",
            )


def save_splits(splits: Sequence[FoldSplit], path: str | os.PathLike[str]) -> Path:
    """Write ``slide_id,fold,split`` rows (CSV, atomic)."""
    rows = [(sid, s.fold, name) for s in splits for name in SPLIT_NAMES for sid in s.part(name)]
    frame = pd.DataFrame(rows, columns=["slide_id", "fold", "split"])
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def load_splits(path: str | os.PathLike[str]) -> list[FoldSplit]:
    """Read a split file written by ``save_splits`` (or by hand: ``slide_id,fold,split``).

    CLAM's split files (``splits_<k>.csv`` with ``train,val,test`` columns, or a folder of them)
    are read by :func:`read_clam_splits`.
    """
    path = Path(path)
    if path.is_dir():
        return read_clam_splits(path)
    if not path.is_file():
        raise MilkitError("split file not found", path=path)
    try:
        frame = pd.read_csv(path, dtype={"slide_id": str, "split": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise MilkitError(f"cannot parse split file ({err})", path=path) from err
    if is_clam_split_frame(frame.columns):
        return read_clam_splits(path)
    missing = [c for c in ("slide_id", "fold", "split") if c not in frame.columns]
    if missing:
        raise MilkitError(
            f"split file lacks column(s) {missing}; it has {list(frame.columns)}",
            path=path,
            hint="The header must be slide_id,fold,split (or CLAM's ,train,val,test)",
        )
    folds = pd.to_numeric(frame["fold"], errors="coerce")
    if folds.isna().any() or (folds % 1 != 0).any():
        raise MilkitError("split file has non-integer fold numbers", path=path)
    split = frame["split"].str.strip().str.lower()
    bad = sorted(set(split) - set(SPLIT_NAMES))
    if bad:
        raise MilkitError("split values must be train/val/test", value=bad, path=path)
    frame = frame.assign(
        fold=folds.astype(int), split=split, slide_id=frame["slide_id"].str.strip()
    )
    dup = frame.duplicated(["slide_id", "fold"], keep=False)
    if dup.any():
        raise MilkitError(
            "split file lists a slide twice in one fold",
            value=frame.loc[dup, ["slide_id", "fold"]].head(5).values.tolist(),
            path=path,
        )
    out = []
    for fold, part in frame.groupby("fold", sort=True):
        ids = {name: part.loc[part["split"] == name, "slide_id"].tolist() for name in SPLIT_NAMES}
        out.append(FoldSplit(int(fold), ids["train"], ids["val"], ids["test"]))
    return out


# ---------------------------------------------------------------------------------- CLAM splits
_CLAM_SPLIT_NAME = re.compile(r"splits_(\d+)(_bool)?\.csv$")


def is_clam_split_frame(columns: Sequence[str]) -> bool:
    """True for CLAM's wide layout: ``train``, ``val``, ``test`` columns and no ``slide_id``."""
    cols = {str(c).strip() for c in columns}
    return {"train", "val", "test"} <= cols and "slide_id" not in cols


def read_clam_splits(path: str | os.PathLike[str]) -> list[FoldSplit]:
    """Read CLAM split files: one ``splits_<k>.csv`` (or ``_bool.csv``), or a folder of them.

    The fold number is ``k`` from the file name (0 when the name has none). Slide ids are kept as
    text (zero padding survives), empty cells are CLAM's padding.

    Returns:
        ``FoldSplit`` per fold, sorted by fold.

    Raises:
        MilkitError: no split files in the folder, a file without ``train,val,test`` columns,
            boolean cells that are not True/False, or a slide in two parts of a fold.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.iterdir()
                if _CLAM_SPLIT_NAME.search(p.name) and "_bool" not in p.name
            ),
            key=lambda p: int(_CLAM_SPLIT_NAME.search(p.name).group(1)),  # type: ignore[union-attr]
        )
        if not files:  # only boolean files
            files = sorted(
                (p for p in path.iterdir() if _CLAM_SPLIT_NAME.search(p.name)),
                key=lambda p: int(_CLAM_SPLIT_NAME.search(p.name).group(1)),  # type: ignore[union-attr]
            )
        if not files:
            raise MilkitError(
                "no CLAM split files (splits_<k>.csv) in folder",
                path=path,
                hint="Pass a milkit split file (slide_id,fold,split) or CLAM's splits folder",
            )
        return [s for f in files for s in read_clam_splits(f)]
    if not path.is_file():
        raise MilkitError("split file not found", path=path)
    found = _CLAM_SPLIT_NAME.search(path.name)
    fold = int(found.group(1)) if found else 0
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, IndexError) as err:
        raise MilkitError(f"cannot parse CLAM split file ({err})", path=path) from err
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"train", "val", "test"} <= set(frame.columns):
        raise MilkitError(
            f"CLAM split file needs train,val,test columns; it has {list(frame.columns)}",
            path=path,
        )
    parts: dict[str, list[str]] = {}
    values = {v.strip().lower() for c in ("train", "val", "test") for v in frame[c]}
    boolean = values <= {"true", "false"}
    for name in ("train", "val", "test"):
        if boolean:  # splits_<k>_bool.csv: slide ids are the index
            ids = frame.index[frame[name].str.strip().str.lower() == "true"]
        else:
            ids = frame[name].str.strip()
            ids = ids[ids != ""]
        parts[name] = [str(s).strip() for s in ids]
    every = parts["train"] + parts["val"] + parts["test"]
    if len(set(every)) != len(every):
        dup = sorted({s for s in every if every.count(s) > 1})
        raise MilkitError(f"CLAM split file puts slide(s) in two parts: {dup[:5]}", path=path)
    return [FoldSplit(fold, parts["train"], parts["val"], parts["test"])]


def write_clam_splits(splits: Sequence[FoldSplit], folder: str | os.PathLike[str]) -> list[Path]:
    """Write ``splits_<k>.csv`` per fold in CLAM's wide layout (atomic), as CLAM's
    ``save_splits`` does; returns the files."""
    folder = Path(folder)
    written = []
    for s in splits:
        cols = {
            name: pd.Series(getattr(s, name), dtype=object) for name in ("train", "val", "test")
        }
        frame = pd.concat(cols, axis=1, ignore_index=False)
        path = folder / f"splits_{s.fold}.csv"
        atomic_write_text(path, frame.to_csv())
        written.append(path)
    return written


__all__ = [
    "FoldSplit",
    "fixed_split",
    "is_clam_split_frame",
    "load_splits",
    "make_cv_splits",
    "read_clam_splits",
    "save_splits",
    "validate_splits",
    "write_clam_splits",
]
