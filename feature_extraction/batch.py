"""Batch bookkeeping of ``milkit preprocess``: which slides, which shard, the manifest, results.

Slides are found and sorted once (``discover_slides``), split deterministically between
``--shard i/n`` and torchrun ranks (``effective_shard``, ``select_shard``), and every finished,
empty or failed slide is one row of ``manifest.csv`` (stable columns, new ones only appended).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_write_text, waiting_lock

SLIDE_EXTENSIONS = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".tif",
    ".tiff",
    ".dcm",
    ".bif",
    ".vms",
    ".svslide",
)
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = (
    "slide_id",
    "status",
    "n_tiles",
    "n_bad_tiles",
    "embed_dim",
    "encoder",
    "mpp",
    "target_mpp",
    "read_level",
    "seg_s",
    "tiling_s",
    "read_s",
    "encode_s",
    "total_s",
    "bag_path",
    "slide_path",
    "error",
    "reason",
    "recipe",
)


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError as err:
        raise MilkitError("shard must look like i/n, e.g. 1/4", value=text) from err
    if not (n >= 1 and 1 <= i <= n):
        raise MilkitError("shard must be i/n with 1 ≤ i ≤ n", value=text)
    return i, n


def effective_shard(shard: tuple[int, int] | None, env: dict[str, str] | None = None) -> tuple:
    """(0-based index, count) combining ``--shard i/n`` with torchrun's RANK / WORLD_SIZE.

    With both, shard i of n is split further across the W ranks: index (i-1)·W + rank of n·W.
    """
    env = dict(os.environ) if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0)
    i, n = shard if shard is not None else (1, 1)
    return (i - 1) * world + rank, n * world


# ---------------------------------------------------------------------------- discovery


def slide_id_of(path: Path) -> str:
    """The slide id used for the bag name: the file stem, or the name of a DICOM series folder.

    :func:`discover_slides` returns a folder only when it holds exactly one DICOM series and no
    other slide; in any other folder a series is returned as its first ``.dcm`` file (sorted by
    name), so its id is that file's stem: stable and unique within the folder.
    """
    if path.is_dir():
        return path.name
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def discover_slides(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Slides among ``paths``: files as given, folders searched recursively by extension.

    Inside a searched folder, DICOM files count once per series (a DICOM WSI is one series of
    ``.dcm`` instances, grouped by SeriesInstanceUID): a folder that is exactly one series and
    holds no other slide is the slide (named after the folder); otherwise each series is given
    by its first file (see :func:`slide_id_of`). Raises if nothing is found.
    """
    from milkit.feature_extraction.slides import dicom_series

    found: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    given = list(paths)
    for raw in given:
        p = Path(raw)
        if p.is_file():
            add(p)
        elif p.is_dir():
            files = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS
            ]
            dicom_dirs = sorted({f.parent for f in files if f.suffix.lower() == ".dcm"})
            series = {d: dicom_series(d) for d in dicom_dirs}
            others = {f.parent for f in files if f.suffix.lower() != ".dcm"}
            for f in files:
                if f.suffix.lower() != ".dcm":
                    add(f)
                    continue
                groups = series[f.parent]
                if len(groups) == 1 and f.parent not in others:
                    add(f.parent)  # the folder is the slide
                elif any(files_[0] == f for files_ in groups.values()):
                    add(f)  # first file of its series
        else:
            raise MilkitError("slide path not found", path=p, hint="Check the path")
    if not found:
        raise MilkitError(
            "no slides found",
            value=[str(g) for g in given],
            hint=f"Give slide files or folders holding {', '.join(SLIDE_EXTENSIONS)} files",
        )
    return found


def select_shard(slides: Sequence[Path], index: int, count: int) -> list[Path]:
    """Deterministic split: slides sorted by (id, path), every ``count``-th from ``index``."""
    ordered = sorted(slides, key=lambda p: (slide_id_of(p), str(p)))
    return ordered[index::count]


# ---------------------------------------------------------------------------- manifest


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """Rows of ``out_dir/manifest.csv`` by slide id (empty if there is none)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def update_manifest(out_dir: Path, row: dict[str, Any]) -> None:
    """Insert/replace one slide's row; read-modify-write under a lock, written atomically."""
    with waiting_lock(out_dir / (MANIFEST_NAME + ".lock")):
        rows = read_manifest(out_dir)
        rows[str(row["slide_id"])] = {k: _fmt(row.get(k)) for k in MANIFEST_FIELDS}
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows):
            writer.writerow(rows[key])
        atomic_write_text(out_dir / MANIFEST_NAME, buf.getvalue())


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------- results


@dataclass
class SlideResult:
    """What happened to one slide (one manifest row)."""

    slide_id: str
    slide_path: str
    status: str  # ok | empty | skipped | failed
    n_tiles: int = 0
    n_bad_tiles: int = 0
    embed_dim: int | None = None
    encoder: str | None = None
    mpp: float | None = None
    target_mpp: float | None = None
    read_level: int | None = None
    seg_s: float = 0.0
    tiling_s: float = 0.0
    read_s: float = 0.0
    encode_s: float = 0.0
    total_s: float = 0.0
    bag_path: str = ""
    error: str = ""
    reason: str = ""  # why a slide is empty, or what a skipped slide's bag holds
    recipe: str = ""  # JSON, see milkit.feature_extraction.recipe


@dataclass
class RunSummary:
    """Outcome of a :func:`preprocess` run."""

    out_dir: Path
    results: list[SlideResult] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when no slide failed, else 1."""
        return 1 if self.failed else 0

    def format(self) -> str:
        """Human summary printed at the end of a run: ok / empty / skipped / failed, with reasons.

        Empty and failed slides are listed one per line; skipped ones are only counted, split by
        what their bag holds (a resumed cohort of thousands stays readable).
        """
        skipped = [r for r in self.results if r.status == "skipped"]
        skipped_empty = sum(r.n_tiles == 0 for r in skipped)
        held = (
            f": {len(skipped) - skipped_empty} ok, {skipped_empty} empty" if skipped_empty else ""
        )
        lines = [
            f"{len(self.results)} slide(s): {self.count('ok')} ok, {self.count('empty')} empty "
            f"(no tiles), {len(skipped)} skipped (already done with the same settings{held}), "
            f"{self.count('failed')} failed"
            + (f", {len(self.skipped_locked)} left to other workers" if self.skipped_locked else "")
            + f"; manifest: {self.out_dir / MANIFEST_NAME}"
        ]
        bad_tiles = sum(r.n_bad_tiles for r in self.results)
        if bad_tiles:
            lines.append(f"{bad_tiles} unreadable tile(s) were dropped (see n_bad_tiles)")
        for r in self.results:
            if r.status == "empty":
                lines.append(f"  EMPTY {r.slide_id}: {r.reason}")
        for r in self.failed:
            lines.append(f"  FAILED {r.slide_id}: {r.error}")
        return "\n".join(lines)
