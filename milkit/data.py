"""Training data: the labels table, bag datasets, batching and class balancing (docs/architecture.md §5).

The labels CSV (``slide_id,label[,case_id][,split]``; other column names with ``slide_column``
/ ``label_column`` / ``case_column``) is validated against the bags folder BEFORE training
starts, and every problem is reported by slide id in one error, so a user fixes the cohort once
instead of once per crash. Labels that mean the same are one class (``1`` = ``1.0``), missing-value
spellings are missing labels, and class names differing only by case or spaces are refused (see
``milkit.labels``). Datasets yield one bag per item; ``collate_bags`` pads a batch of bags to a
common length with a mask, the batch format of ``models.base``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from milkit.bags import BagHeader, find_bag, read_bag, read_bag_header
from milkit.errors import MilkitError
from milkit.labels import (
    canonical_label,
    class_sort_key,
    label_key,
    numeric_value,
    strip_slide_extension,
)
from milkit.provenance import BagSpec, bag_spec, cohort_spec, describe_group, group_specs

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}
_SHOW_PER_KIND = 5  # ids listed per problem kind before "... and N more"
_SCAN_CHUNK_BYTES = 16 * 1024 * 1024  # NaN/inf scan reads ~16 MiB at a time
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
        bag_specs: provenance of each slide's bag (``milkit.provenance.BagSpec``).
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
        from milkit.atomic import atomic_path

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


def _scan_finite(path: Path) -> bool:
    """True when every feature value of the bag is finite; reads ~16 MiB blocks."""
    if path.suffix == ".pt":
        return bool(np.isfinite(read_bag(path).features).all())
    with h5py.File(path, "r") as f:
        ds = f["features"]
        n, dim = ds.shape
        if n == 0:
            return True
        rows = max(1, _SCAN_CHUNK_BYTES // max(1, dim * ds.dtype.itemsize))
        buf = np.empty((min(rows, n), dim), dtype=ds.dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            view = buf[: stop - start]
            ds.read_direct(view, np.s_[start:stop])
            if not np.isfinite(view).all():
                return False
    return True


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
            weights, tile sizes or resolutions (``milkit.provenance``).
    """
    csv_path = Path(csv_path)
    bags_dir = Path(bags_dir)
    frame = _read_labels_csv(csv_path, slide_column, label_column, case_column)
    from milkit.bag_folders import missing_bags_hint, resolve_bag_folder

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
    from milkit.feature_extraction.extract import read_manifest

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
                finite = _scan_finite(path)
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


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _AugmentMixin:
    """Training-time augmentations shared by the bag datasets.

    Off by default; ``train(True)`` switches them on. Instance subsampling keeps the chosen rows in
    their original (raster) order, since order-sensitive models (R2T, MambaMIL, TransMIL) depend
    on it. Feature dropout zeroes single feature values with probability p and rescales the rest
    by 1 / (1 - p) (inverted dropout, as ``torch.nn.functional.dropout``), so evaluation needs no
    correction.
    """

    max_instances: int | None
    eval_max_instances: int | None
    feature_dropout: float
    seed: int
    training: bool

    def _init_augment(
        self,
        max_instances: int | None,
        feature_dropout: float,
        seed: int,
        eval_max_instances: int | None = None,
    ) -> None:
        for name, value in (("max_instances", max_instances),
                            ("eval_max_instances", eval_max_instances)):  # fmt: skip
            if value is not None and value < 1:
                raise MilkitError(f"{name} must be a positive integer", value=value)
        self.eval_max_instances = eval_max_instances
        if not 0.0 <= feature_dropout < 1.0:
            raise MilkitError("feature_dropout must be in [0, 1)", value=feature_dropout)
        self.max_instances = max_instances
        self.feature_dropout = float(feature_dropout)
        self.seed = int(seed)
        self.training = False
        self._epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, ...] | None = None

    def train(self, mode: bool = True) -> Any:
        """Switch augmentations on (``True``) or off; returns the dataset."""
        self.training = bool(mode)
        return self

    def eval(self) -> Any:
        return self.train(False)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentations for ``epoch`` (reproducible runs, also across resumes)."""
        self._epoch = int(epoch)
        self._rng = None

    def _generator(self) -> np.random.Generator:
        # A DataLoader worker gets a fresh per-epoch seed from torch (worker_info.seed), derived
        # from the loader's generator, so worker runs stay reproducible under a fixed torch seed.
        info = torch.utils.data.get_worker_info()
        key = (self.seed, self._epoch) if info is None else (self.seed, self._epoch, info.seed)
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng(key)
            self._rng_key = key
        return self._rng

    def _eval_cap(
        self, features: torch.Tensor, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outside training, keep ``eval_max_instances`` evenly spaced instances of a larger bag.

        Deterministic (no RNG: the same tiles every epoch and every run) and spread over the
        whole slide in raster order; an approximation chosen by the user to fit memory
        (``--eval-max-instances``, ``milkit predict --max-instances``).
        """
        cap, n = self.eval_max_instances, features.shape[0]
        if cap is None or n <= cap:
            return features, coords
        idx = torch.from_numpy(np.linspace(0, n - 1, cap).round().astype(np.int64))
        return features.index_select(0, idx), None if coords is None else coords.index_select(
            0, idx
        )

    def _augment(
        self, features: torch.Tensor, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training:
            return self._eval_cap(features, coords)
        rng = None
        n = features.shape[0]
        if self.max_instances is not None and n > self.max_instances:
            rng = self._generator()
            keep = np.sort(rng.choice(n, size=self.max_instances, replace=False))
            idx = torch.from_numpy(keep)
            features = features.index_select(0, idx)
            coords = None if coords is None else coords.index_select(0, idx)
        if self.feature_dropout > 0.0:
            rng = rng or self._generator()
            p = self.feature_dropout
            keep_mask = rng.random(tuple(features.shape), dtype=np.float32) >= p
            features = features * torch.from_numpy(keep_mask).to(features.dtype) / (1.0 - p)
        return features, coords


def _item(features: torch.Tensor, coords: torch.Tensor | None, label: int, sid: str) -> dict:
    return {"features": features, "coords": coords, "label": int(label), "slide_id": sid}


def _raw_plan(ds: h5py.Dataset) -> list[tuple[int, int, int]] | None:
    """File byte ranges of an uncompressed dataset as (row_start, row_stop, file_offset), or
    None when the fast path does not apply (filters, foreign byte order, partial chunks, ...).

    Bags are written row-chunked without filters (docs/architecture.md §4), so the features are a few
    contiguous byte runs that can be read straight into the output array.
    """
    n, dim = ds.shape
    dtype = ds.dtype
    if dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        return None
    if dtype.kind != "f" or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset:
        return None
    if ds.external or ds.is_virtual:
        return None
    dsid = ds.id
    if ds.chunks is None:
        offset = dsid.get_offset()
        return None if offset is None else [(0, n, int(offset))]
    rows, cols = ds.chunks
    if cols != dim:
        return None
    count = dsid.get_num_chunks()
    if count != -(-n // rows):
        return None
    chunk_bytes = rows * dim * dtype.itemsize
    plan = []
    for k in range(count):
        info = dsid.get_chunk_info(k)
        if info.filter_mask or info.size != chunk_bytes or info.byte_offset is None:
            return None
        start = int(info.chunk_offset[0])
        plan.append((start, min(n, start + rows), int(info.byte_offset)))
    plan.sort()
    return plan


def _pread_into(path: Path, out: np.ndarray, plan: list[tuple[int, int, int]]) -> bool:
    """Fill ``out`` from the byte ranges of ``plan``; False if the file came up short."""
    row_bytes = out.shape[1] * out.dtype.itemsize
    flat = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, stop, offset in plan:
            want = (stop - start) * row_bytes
            view = flat[start * row_bytes : start * row_bytes + want]
            done = 0
            while done < want:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    return False
                done += got
    finally:
        os.close(fd)
    return True


def _read_float16_as_float32(
    path: Path, shape: tuple[int, int], plan: list[tuple[int, int, int]]
) -> np.ndarray:
    """Read a float16 bag straight from its byte ranges and widen it to float32 in one call.

    One bulk conversion (torch's vectorised half→float kernel) is ~6× faster here than
    converting in small cache-sized steps, whose per-call cost dominated (measured 0.23 s vs
    0.04 s for 10^7 values).
    """
    half = np.empty(shape, dtype=np.float16)
    if not _pread_into(path, half, plan):
        with h5py.File(path, "r") as f:
            return f["features"][()].astype(np.float32)
    return torch.from_numpy(half).to(torch.float32).numpy()


def _read_h5_arrays(path: Path, load_coords: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (as float32) and coords of one HDF5 bag.

    Uncompressed bags (ours, TRIDENT's, CLAM's) are read with ``os.preadv`` straight from the
    chunk byte ranges into the output array (about twice as fast as HDF5's own read path, which
    goes through its chunk cache); anything else falls back to ``read_direct``.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise MilkitError(f"cannot open bag as HDF5 ({err})", path=path) from err
    with f:
        if "features" not in f:
            raise MilkitError("bag has no 'features' dataset", path=path)
        ds = f["features"]
        if ds.ndim != 2:
            raise MilkitError("bag 'features' must be 2-D (N, D)", value=ds.shape, path=path)
        plan = _raw_plan(ds) if ds.size and hasattr(os, "preadv") else None
        if plan is not None and ds.dtype == np.float16:
            features = None  # read below, straight into the float32 output
        else:
            features = np.empty(ds.shape, dtype=ds.dtype)
            if features.size and plan is None:
                ds.read_direct(features)
        shape = ds.shape
        coords = None
        if load_coords and "coords" in f:
            cds = f["coords"]
            coords = np.empty(cds.shape, dtype=np.int64)
            if coords.size:
                cds.read_direct(coords)
    if features is None:
        features = _read_float16_as_float32(path, shape, plan)  # type: ignore[arg-type]
    elif plan is not None and not _pread_into(path, features, plan):
        with h5py.File(path, "r") as f:
            f["features"].read_direct(features)
    if features.dtype != np.float32:
        features = features.astype(np.float32)
    return features, coords


class BagDataset(_AugmentMixin, Dataset):
    """Bags read lazily from disk, one slide per item.

    Item: ``{"features": float32 (N, D), "coords": int64 (N, 2) | None, "label": int,
    "slide_id": str}``. Files are opened per item (safe with DataLoader workers, which must not
    share HDF5 handles). ``cache=True`` keeps loaded bags in memory (per process: with DataLoader
    workers it pays off only with ``persistent_workers=True``; otherwise use ``num_workers=0``).

    Args:
        paths: bag files (``.h5``/``.hdf5`` or legacy ``.pt``).
        labels: integer labels, one per path; None gives -1 (prediction without labels).
        slide_ids: names; default from the file names.
        cache: keep loaded bags in memory.
        max_instances: in training mode, subsample larger bags to this many instances.
        eval_max_instances: outside training mode, keep this many evenly spaced instances of
            larger bags (an approximation to fit memory; default: whole bags).
        feature_dropout: in training mode, drop feature values with this probability.
        load_coords: read ``coords`` (needed by coordinate-aware models and heatmaps).
        seed: seed of the augmentations.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | np.ndarray | None = None,
        slide_ids: Sequence[str] | None = None,
        *,
        cache: bool = False,
        max_instances: int | None = None,
        eval_max_instances: int | None = None,
        feature_dropout: float = 0.0,
        load_coords: bool = True,
        seed: int = 0,
    ) -> None:
        from milkit.bags import slide_id_from_path

        self.paths = [Path(p) for p in paths]
        n = len(self.paths)
        self.labels = _as_labels(labels, n)
        self.slide_ids = (
            [slide_id_from_path(p) for p in self.paths]
            if slide_ids is None
            else [str(s) for s in slide_ids]
        )
        if len(self.slide_ids) != n:
            raise MilkitError(
                f"got {n} bag paths but {len(self.slide_ids)} slide ids", value=len(self.slide_ids)
            )
        self.cache = bool(cache)
        self.load_coords = bool(load_coords)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._init_augment(max_instances, feature_dropout, seed, eval_max_instances)

    @classmethod
    def from_table(
        cls, table: LabelTable, slide_ids: Sequence[str] | None = None, **kwargs: Any
    ) -> BagDataset:
        """The bags of ``table`` (or of ``slide_ids`` from it, in that order) with their labels."""
        sub = table if slide_ids is None else table.subset(slide_ids)
        frame = sub.frame
        return cls(
            frame["bag_path"].tolist(),
            frame["label_idx"].to_numpy(dtype=np.int64),
            frame["slide_id"].tolist(),
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (float32) and coords of bag ``index``, without augmentation."""
        if index in self._cache:
            return self._cache[index]
        path = self.paths[index]
        if path.suffix == ".pt":
            bag = read_bag(path)
            feats, crd = bag.features.astype(np.float32, copy=False), bag.coords
        else:
            if not path.is_file():
                raise MilkitError("bag file not found", path=path)
            feats, crd = _read_h5_arrays(path, self.load_coords)
        features = torch.from_numpy(np.ascontiguousarray(feats))
        coords = torch.from_numpy(crd) if (crd is not None and self.load_coords) else None
        if self.cache:
            self._cache[index] = (features, coords)
        return features, coords

    def __getitem__(self, index: int) -> dict[str, Any]:
        features, coords = self.load(index)
        features, coords = self._augment(features, coords)
        return _item(features, coords, int(self.labels[index]), self.slide_ids[index])


class InMemoryBagDataset(_AugmentMixin, Dataset):
    """Bags held in memory (synthetic MIL tasks, the Musk benchmarks); same items as BagDataset.

    Args:
        bags: (N_i, D) arrays or tensors, one per bag.
        labels: integer bag labels.
        slide_ids: names; default ``bag_0``, ``bag_1``, ...
        coords: optional (N_i, 2) coordinates per bag.
        max_instances, feature_dropout, seed: training-mode augmentations (see BagDataset).
        eval_max_instances: evaluation-time cap (see BagDataset).
    """

    def __init__(
        self,
        bags: Sequence[np.ndarray | torch.Tensor],
        labels: Sequence[int] | np.ndarray,
        slide_ids: Sequence[str] | None = None,
        coords: Sequence[np.ndarray | torch.Tensor] | None = None,
        *,
        max_instances: int | None = None,
        eval_max_instances: int | None = None,
        feature_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        n = len(bags)
        self.bags = [_as_float32(b, i) for i, b in enumerate(bags)]
        self.labels = _as_labels(labels, n)
        self.slide_ids = (
            [f"bag_{i}" for i in range(n)] if slide_ids is None else [str(s) for s in slide_ids]
        )
        if len(self.slide_ids) != n:
            raise MilkitError(f"got {n} bags but {len(self.slide_ids)} slide ids", value=n)
        if coords is not None:
            if len(coords) != n:
                raise MilkitError(f"got {n} bags but {len(coords)} coords arrays", value=n)
            self.coords: list[torch.Tensor] | None = [
                torch.as_tensor(np.asarray(c), dtype=torch.int64) for c in coords
            ]
            for i, (b, c) in enumerate(zip(self.bags, self.coords, strict=True)):
                if c.shape != (b.shape[0], 2):
                    raise MilkitError(f"coords of bag {i} must be ({b.shape[0]}, 2)", value=c.shape)
        else:
            self.coords = None
        self._init_augment(max_instances, feature_dropout, seed, eval_max_instances)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict[str, Any]:
        coords = None if self.coords is None else self.coords[index]
        features, coords = self._augment(self.bags[index], coords)
        return _item(features, coords, int(self.labels[index]), self.slide_ids[index])


def _as_float32(bag: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
    t = bag.detach().cpu() if isinstance(bag, torch.Tensor) else torch.from_numpy(np.asarray(bag))
    if t.ndim != 2:
        raise MilkitError(f"bag {index} must be a 2-D (N, D) array", value=tuple(t.shape))
    return t.to(torch.float32).contiguous()


def _as_labels(labels: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise MilkitError(f"need one label per bag ({n})", value=arr.shape)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise MilkitError("labels must be integers (class indices)", value=arr.dtype.name)
    return arr.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Batching and class balance
# --------------------------------------------------------------------------------------------


def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of bag items into one batch (the batch format of ``models.base``).

    Returns ``features`` (B, N_max, D) zero-padded, ``mask`` (B, N_max) bool with True at real
    instances (None when B == 1: the unpadded exact-reproduction path), ``coords`` (B, N_max, 2)
    int64 or None (None unless every item has coords), ``label`` (B,) int64, ``slide_id`` list.
    """
    if len(items) == 0:
        raise MilkitError("cannot collate an empty batch", value=0)
    feats = [it["features"] for it in items]
    dims = {int(f.shape[1]) for f in feats}
    if len(dims) != 1:
        ids = [it["slide_id"] for it in items]
        raise MilkitError(
            f"bags in one batch have different feature dims {sorted(dims)}", value=ids
        )
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.int64)
    slide_ids = [str(it["slide_id"]) for it in items]
    has_coords = all(it.get("coords") is not None for it in items)
    if len(items) == 1:
        coords = items[0]["coords"].unsqueeze(0) if has_coords else None
        return {
            "features": feats[0].unsqueeze(0),
            "mask": None,
            "coords": coords,
            "label": labels,
            "slide_id": slide_ids,
        }
    b, d = len(items), dims.pop()
    n_max = max(int(f.shape[0]) for f in feats)
    features = feats[0].new_zeros((b, n_max, d))
    mask = torch.zeros((b, n_max), dtype=torch.bool)
    coords = torch.zeros((b, n_max, 2), dtype=torch.int64) if has_coords else None
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        features[i, :n] = it["features"]
        mask[i, :n] = True
        if coords is not None:
            coords[i, :n] = it["coords"]
    return {
        "features": features,
        "mask": mask,
        "coords": coords,
        "label": labels,
        "slide_id": slide_ids,
    }


def _label_counts(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(labels, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise MilkitError("labels must be a non-empty 1-D sequence", value=arr.shape)
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        raise MilkitError(
            f"labels must be class indices in [0, {num_classes})",
            value=(int(arr.min()), int(arr.max())),
        )
    return np.bincount(arr, minlength=num_classes or 0)


def balanced_weights(labels: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Per-bag weights 1 / (count of its class), float64: every class has total weight 1, so
    sampling with replacement draws each class equally often (``--balanced``).

    Raises:
        MilkitError: labels that are not a non-empty 1-D sequence of class indices >= 0.
    """
    arr = np.asarray(labels, dtype=np.int64)
    counts = _label_counts(arr)
    return torch.as_tensor(1.0 / counts[arr], dtype=torch.double)


def balanced_sampler(
    labels: Sequence[int] | np.ndarray,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """Sampler drawing every class equally often (with replacement, ``num_samples`` per epoch).

    Each bag is weighted by :func:`balanced_weights`. The Trainer draws with the same weights
    through ``milkit.distributed.EpochSampler`` (epoch-seeded, sharded over DDP ranks).
    """
    weights = balanced_weights(labels)
    return WeightedRandomSampler(
        weights,
        num_samples=len(weights) if num_samples is None else int(num_samples),
        replacement=True,
        generator=generator,
    )


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights n / (C * n_c) (scikit-learn's "balanced").

    A class absent from ``labels`` gets weight 0 (it never appears as a target, so its weight has
    no effect; 0 avoids an infinity).
    """
    counts = _label_counts(labels, num_classes).astype(np.float64)
    total = counts.sum()
    weights = np.where(counts > 0, total / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


__all__ = [
    "BagDataset",
    "InMemoryBagDataset",
    "LabelTable",
    "balanced_sampler",
    "balanced_weights",
    "class_weights",
    "collate_bags",
    "load_labels",
]
