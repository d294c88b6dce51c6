"""The labels table: a labels CSV checked against the bags folder (docs/architecture.md §5).

The labels CSV (``slide_id,label[,case_id][,split]``; other column names with ``slide_column``
/ ``label_column`` / ``case_column``) is validated against the bags folder BEFORE training
starts, and every problem is reported by slide id in one error, so a user fixes the cohort once
instead of once per crash. Labels that mean the same are one class (``1`` = ``1.0``),
missing-value spellings are missing labels, and class names differing only by case or spaces are
refused (see ``milkit.data.label_cells``).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milkit.data.label_cells import (
    canonical_label,
    class_sort_key,
    label_key,
    numeric_value,
    strip_slide_extension,
)
from milkit.data.provenance import BagSpec, bag_spec, cohort_spec, describe_group, group_specs
from milkit.errors import MilkitError
from milkit.io.bags import BagHeader, features_are_finite, find_bag, read_bag_header

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}
_SHOW_PER_KIND = 5  # ids listed per problem kind before "... and N more"
# Columns often used for the slide id, suggested when ``slide_id`` is absent.
_SLIDE_COLUMN_GUESSES = ("slide", "slide_name", "slide_id", "filename", "file", "image", "wsi")

# Problem kinds that mean "this slide has no usable bag"; ``skip_missing`` drops these slides.
MISSING_BAG = "missing bag"
UNREADABLE_BAG = "unreadable bag"
EMPTY_BAG = "empty bag (0 instances)"
NONFINITE_BAG = "NaN/inf features"
FAILED_IN_MANIFEST = "listed as failed in manifest.csv"
SKIPPABLE = (MISSING_BAG, UNREADABLE_BAG, EMPTY_BAG, NONFINITE_BAG, FAILED_IN_MANIFEST)
MIXED_SPECS = "bags from different encoders or tile specs"
SKIPPED_FILE = "skipped_slides.csv"


# --------------------------------------------------------------------------------------------
# Labels table
# --------------------------------------------------------------------------------------------


@dataclass
class LabelTable:
    """A validated cohort: one row per slide, with its label, case and bag file.

    Attributes:
        frame: columns ``slide_id`` (str), ``label`` (str), ``label_idx`` (int, indexes
            ``class_names``), ``case_id`` (str, defaults to ``slide_id``), ``bag_path`` (str) and,
            when the CSV has one, ``split`` (``train``/``val``/``test``).
        class_names: unique labels, numbers in numeric order, then text.
        in_dim: feature dimension shared by every bag.
        csv_path: the labels CSV this table was read from (None when built in memory).
        bags_dir: the folder the bags were found in.
        notes: what was changed while reading (e.g. slide-file extensions stripped from ids).
        skipped: ``(slide_id, reason)`` of slides dropped by ``skip_missing``.
        bag_specs: provenance of each slide's bag (``milkit.data.provenance.BagSpec``).
    """

    frame: pd.DataFrame
    class_names: list[str]
    in_dim: int
    csv_path: Path | None = None
    bags_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bag_specs: dict[str, BagSpec] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def slide_ids(self) -> list[str]:
        return self.frame["slide_id"].tolist()

    @property
    def labels(self) -> np.ndarray:
        """Integer labels (``label_idx``) in row order."""
        return self.frame["label_idx"].to_numpy(dtype=np.int64)

    @property
    def has_split(self) -> bool:
        return "split" in self.frame.columns

    @property
    def bag_spec(self) -> dict[str, Any]:
        """The cohort's encoder, weights hash, feature dim, tile size and resolution (run.json)."""
        return cohort_spec(self.bag_specs)

    def subset(self, slide_ids: Iterable[str]) -> LabelTable:
        """The rows of ``slide_ids`` in the given order (unknown ids raise a MilkitError)."""
        slide_ids = list(slide_ids)
        index = pd.Index(self.frame["slide_id"])
        pos = index.get_indexer(slide_ids)
        unknown = [s for s, p in zip(slide_ids, pos, strict=True) if p < 0]
        if unknown:
            raise MilkitError(
                f"{len(unknown)} slide id(s) are not in the labels table: {_show(unknown)}",
                path=self.csv_path,
                hint="Check that the split file belongs to this labels CSV",
            )
        frame = self.frame.iloc[pos].reset_index(drop=True)
        specs = {s: self.bag_specs[s] for s in slide_ids if s in self.bag_specs}
        return dataclasses.replace(
            self, frame=frame, class_names=list(self.class_names), bag_specs=specs
        )

    def write_skipped(self, out_dir: str | os.PathLike[str]) -> Path | None:
        """Write ``skipped_slides.csv`` (slide_id, reason) into ``out_dir``; None if none."""
        if not self.skipped:
            return None
        from milkit.io.atomic import atomic_path

        path = Path(out_dir) / SKIPPED_FILE
        with atomic_path(path) as tmp:
            pd.DataFrame(self.skipped, columns=["slide_id", "reason"]).to_csv(tmp, index=False)
        return path


def _show(items: Sequence[Any], limit: int = _SHOW_PER_KIND) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown


def _read_labels_csv(
    csv_path: Path, slide_column: str, label_column: str, case_column: str | None
) -> pd.DataFrame:
    """The CSV as strings, columns renamed to slide_id/label/case_id.

    Every cell is stripped of surrounding spaces except ``label``, kept as written so that
    ``load_labels`` can tell ``'Tumour'`` from ``'Tumour '``.
    """
    if not csv_path.is_file():
        raise MilkitError("labels CSV not found", path=csv_path)
    try:
        with csv_path.open(encoding="utf-8-sig") as fh:
            header = fh.readline()
        # comma by default; tab- or semicolon-separated files (spreadsheet exports) also work
        sep = next((c for c in (",", "\t", ";") if c in header), ",")
        frame = pd.read_csv(
            csv_path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",  # drops a spreadsheet's byte-order mark from the header
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MilkitError(
            f"cannot parse labels CSV ({type(err).__name__}: {err})",
            path=csv_path,
            hint="Write a comma-separated file with a header: slide_id,label[,case_id][,split]",
        ) from err
    frame.columns = [str(c).strip() for c in frame.columns]
    wanted = [slide_column, label_column] + ([case_column] if case_column else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        hint = "Name the columns with --slide-column / --label-column / --case-column"
        if slide_column in missing:
            guess = [c for c in frame.columns if c.lower() in _SLIDE_COLUMN_GUESSES]
            if guess:
                hint += f" (e.g. --slide-column {guess[0]})"
        raise MilkitError(
            f"labels CSV lacks column(s) {missing}; it has {list(frame.columns)}",
            path=csv_path,
            hint=hint,
        )
    renames = {slide_column: "slide_id", label_column: "label"}
    if case_column:
        renames[case_column] = "case_id"
    # a column already called slide_id/label/case_id that is not the chosen one is dropped
    shadowed = [c for c in renames.values() if c in frame.columns and c not in renames]
    frame = frame.drop(columns=shadowed).rename(columns=renames)
    for col in frame.columns:
        frame[col] = frame[col].astype(str)
        if col != "label":
            frame[col] = frame[col].str.strip()
    return frame


def _strip_extensions(frame: pd.DataFrame, bags_dir: Path) -> list[str]:
    """Drop slide-file extensions from ids (``S01.svs`` → ``S01``) unless a bag carries the full
    id; returns the note to show (empty when nothing changed)."""
    changed: list[str] = []
    ids = frame["slide_id"].tolist()
    for i, sid in enumerate(ids):
        stem = strip_slide_extension(sid)
        if stem is not None and find_bag(bags_dir, sid) is None:
            ids[i] = stem
            changed.append(f"{sid} -> {stem}")
    frame["slide_id"] = ids
    if not changed:
        return []
    return [
        f"{len(changed)} slide id(s) ended with a slide-file extension, which was dropped "
        f"(bags are named after the slide file's stem): {_show(changed)}"
    ]


def _spelling_conflicts(frame: pd.DataFrame, canon: list[str | None]) -> list[str]:
    """Entries ``'Tumour' (3: S1, S2, S3) vs 'tumour' (1: S4)`` for class names that differ
    only by case or spaces (numbers excluded: they already compare as numbers)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for sid, raw, name in zip(frame["slide_id"], frame["label"], canon, strict=True):
        if name is None:
            continue
        spelling = name if numeric_value(raw) is not None else raw  # text: as written
        groups.setdefault(label_key(name), {}).setdefault(spelling, []).append(sid)
    out = []
    for spellings in groups.values():
        if len(spellings) > 1:
            parts = [
                f"{s!r} ({len(ids)}: {_show(ids, 3)})"
                for s, ids in sorted(spellings.items(), key=lambda kv: -len(kv[1]))
            ]
            out.append(" vs ".join(parts))
    return out


def load_labels(
    csv_path: str | os.PathLike[str],
    bags_dir: str | os.PathLike[str],
    *,
    label_column: str = "label",
    slide_column: str = "slide_id",
    case_column: str | None = None,
    check_finite: bool = True,
    class_names: Sequence[str] | None = None,
    skip_missing: bool = False,
    check_bag_specs: bool = True,
) -> LabelTable:
    """Read and validate a labels CSV against a bags folder.

    Every problem is collected first and then reported in ONE ``MilkitError`` listing the
    offending slide ids per kind: duplicated ids, missing labels (empty, ``NA``, ``N/A``,
    ``nan``, ``None``, ``null``), class names differing only by case or spaces, labels outside
    ``class_names``, a single class, missing/unreadable bags, empty bags, slides listed as failed
    in the bags folder's ``manifest.csv``, mixed feature dimensions, bags from different encoders
    or tile specs (``check_bag_specs``) and (``check_finite``) NaN/inf features. The exception
    also carries ``err.problems`` (kind -> list of slide ids).

    Numeric labels compare as numbers (``1``, ``1.0`` and ``01`` are class ``"1"``). Slide ids
    written with the slide file's extension (``S01.svs``) are stripped to the bag's id, with a
    note in ``LabelTable.notes``.

    Args:
        csv_path: ``slide_id,label[,case_id][,split]`` (extra columns are kept).
        bags_dir: folder with ``<slide_id>.h5`` (or ``.hdf5``/``.pt``) bags.
        label_column: name of the label column.
        slide_column: name of the slide-id column.
        case_column: name of the case (patient) column; default ``case_id`` when present, else
            every slide is its own case.
        check_finite: scan every bag for NaN/inf (reads all features once, in blocks).
        class_names: the known classes (e.g. a trained model's label map); labels outside it are
            errors and a single present class is allowed. Default: the labels present.
        skip_missing: drop slides without a usable bag (missing, unreadable, empty, NaN/inf, or
            listed as failed in ``manifest.csv``) instead of failing; they are listed in
            ``LabelTable.skipped`` with the reason (``write_skipped`` saves them).
        check_bag_specs: refuse a cohort whose bags come from different encoders, encoder
            weights, tile sizes or resolutions (``milkit.data.provenance``).
    """
    csv_path = Path(csv_path)
    bags_dir = Path(bags_dir)
    frame = _read_labels_csv(csv_path, slide_column, label_column, case_column)
    from milkit.io.bag_folders import missing_bags_hint, resolve_bag_folder

    folder = resolve_bag_folder(bags_dir)  # also a TRIDENT job/tiling or CLAM feature folder
    bags_dir = folder.path
    problems: dict[str, list[str]] = {}
    notes: list[str] = [folder.note] if folder.note else []

    def report(kind: str, entry: str) -> None:
        problems.setdefault(kind, []).append(entry)

    if len(frame) == 0:
        raise MilkitError("labels CSV has no rows", path=csv_path)
    for sid in frame.loc[frame["slide_id"] == "", "slide_id"].index:
        report("empty slide_id (row number)", str(int(sid) + 2))
    frame = frame[frame["slide_id"] != ""].reset_index(drop=True)
    notes += _strip_extensions(frame, bags_dir)
    dup = frame["slide_id"][frame["slide_id"].duplicated(keep="first")]
    for sid in sorted(set(dup)):
        report("duplicated slide_id", sid)
    frame = frame.drop_duplicates("slide_id", keep="first").reset_index(drop=True)

    canon = [canonical_label(raw) for raw in frame["label"]]  # None: missing
    for sid, raw, name in zip(frame["slide_id"], frame["label"], canon, strict=True):
        if name is None:
            report("missing label", sid if not raw.strip() else f"{sid} ({raw.strip()!r})")
    for entry in _spelling_conflicts(frame, canon):
        report("class names that differ only by case or spaces", entry)
    frame["label"] = [name or "" for name in canon]
    labelled = frame["label"] != ""

    if "case_id" in frame.columns:
        frame["case_id"] = frame["case_id"].where(frame["case_id"] != "", frame["slide_id"])
    else:
        frame["case_id"] = frame["slide_id"]
    if "split" in frame.columns:
        split = frame["split"].str.lower().replace(_SPLIT_ALIASES)
        for sid, value in frame.loc[~split.isin(SPLIT_NAMES), ["slide_id", "split"]].itertuples(
            index=False
        ):
            report("split not train/val/test", f"{sid} ({value!r})")
        frame["split"] = split

    # ---- bags: existence, manifest status, readability, size, finiteness
    from milkit.feature_extraction.batch import read_manifest

    manifest = read_manifest(bags_dir)
    bag_problems: dict[str, tuple[str, str]] = {}  # slide id -> (kind, detail)
    headers: dict[str, BagHeader] = {}
    paths: list[str] = []
    for sid in frame["slide_id"]:
        row = manifest.get(sid, {})
        failed = row.get("status") == "failed"
        why = f"preprocessing failed: {row.get('error') or 'no error recorded'}" if failed else ""
        path = find_bag(bags_dir, sid)
        paths.append("" if path is None else str(path))
        if path is None:
            bag_problems[sid] = (MISSING_BAG, why)
            continue
        if failed:  # a bag left from an earlier run: the latest attempt failed
            bag_problems[sid] = (FAILED_IN_MANIFEST, why)
            continue
        try:
            header = read_bag_header(path)
        except MilkitError as err:
            bag_problems[sid] = (UNREADABLE_BAG, err.what)
            continue
        if header.num_instances == 0:
            bag_problems[sid] = (EMPTY_BAG, "")
        elif check_finite:
            try:
                finite = features_are_finite(path)
            except (OSError, MilkitError) as err:
                bag_problems[sid] = (UNREADABLE_BAG, str(err))
                continue
            if not finite:
                bag_problems[sid] = (NONFINITE_BAG, "")
        headers[sid] = header
    frame["bag_path"] = paths

    skipped: list[tuple[str, str]] = []
    if skip_missing and bag_problems:
        for sid, (kind, detail) in bag_problems.items():
            skipped.append((sid, f"{kind}: {detail}" if detail else kind))
            headers.pop(sid, None)
        frame = frame[~frame["slide_id"].isin(bag_problems)].reset_index(drop=True)
        labelled = frame["label"] != ""
        notes.append(
            f"--skip-missing: left out {len(skipped)} slide(s) without a usable bag: "
            + _show([f"{s} ({r})" for s, r in skipped])
        )
        if len(frame) == 0:
            report("no slide left after skipping those without a usable bag", str(len(skipped)))
    else:
        for sid, (kind, detail) in bag_problems.items():
            report(kind, f"{sid} ({detail})" if detail else sid)

    # ---- classes (after skipping: a class may only exist on skipped slides)
    if class_names is None:
        names = sorted(set(frame.loc[labelled, "label"]), key=class_sort_key)
        if len(names) == 1:
            n_lab = int(labelled.sum())
            report("only one class (training needs two or more)", f"{names[0]!r} on all {n_lab}")
        index = {name: i for i, name in enumerate(names)}
    else:
        names = [str(c) for c in class_names]
        # the run's names are compared in canonical form too (a run may say "1.0")
        index = {(canonical_label(n) or n): i for i, n in enumerate(names)}
        for sid, lab in frame.loc[labelled, ["slide_id", "label"]].itertuples(index=False):
            if lab not in index:
                report(f"label not in the known classes {names}", f"{sid} ({lab!r})")

    # ---- feature dims and provenance of the usable bags
    dims = Counter(h.dim for h in headers.values())
    in_dim = dims.most_common(1)[0][0] if dims else 0
    if len(dims) > 1:
        for sid, header in headers.items():
            if header.dim != in_dim:
                report(
                    f"feature dim differs from the majority D={in_dim}", f"{sid} (D={header.dim})"
                )
    specs = {sid: bag_spec(h) for sid, h in headers.items()}
    groups = group_specs(specs)
    if check_bag_specs and len(groups) > 1:
        for spec, ids in groups:
            report(MIXED_SPECS, describe_group(spec, ids))

    if problems:
        total = sum(len(v) for v in problems.values())
        lines = [f"{kind} ({len(ids)}): {_show(ids)}" for kind, ids in problems.items()]
        hint = f"Fix the CSV or the bags in {bags_dir} and rerun; nothing was trained"
        if any(k in problems for k in SKIPPABLE):
            hint += " (--skip-missing leaves out slides without a usable bag and lists them)"
        if MISSING_BAG in problems:
            missing = [sid for sid, (kind, _) in bag_problems.items() if kind == MISSING_BAG]
            hint += "; " + missing_bags_hint(bags_dir, missing)
        if MIXED_SPECS in problems:
            hint += (
                "; re-extract the odd bags with one encoder and tile spec (milkit info BAG "
                "shows a bag's)"
            )
        if notes:
            hint += ". Notes: " + "; ".join(notes)
        err = MilkitError(
            f"labels CSV failed validation with {total} problem(s): " + "; ".join(lines),
            path=csv_path,
            hint=hint,
        )
        err.problems = problems  # type: ignore[attr-defined]
        raise err

    frame["label_idx"] = frame["label"].map(index).astype(np.int64)
    if class_names is not None:  # the run's spelling of each class
        frame["label"] = [names[i] for i in frame["label_idx"]]
    first = ["slide_id", "label", "label_idx", "case_id"]
    rest = [c for c in frame.columns if c not in first]
    frame = frame[first + rest]
    return LabelTable(frame, list(names), int(in_dim), csv_path, bags_dir, notes, skipped, specs)
