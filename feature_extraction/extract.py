"""Slides → bags: the batch pipeline behind ``milkit preprocess`` (docs/architecture.md §4, §7).

Per slide: open → segment tissue → plan tiles → encode tiles → write ``<slide_id>.h5`` → QC PNG.
Tiles are read by DataLoader workers, each with its own slide handle (opened in
``worker_init_fn``: OpenSlide handles must not cross processes); encoding runs batched under
``torch.inference_mode`` with autocast and channels_last, features are stored as float32.

Batch rules: a failing slide is recorded in ``manifest.csv`` and the run goes on; a tile that
cannot be decoded is counted and dropped from the bag (all of them unreadable: the slide fails).
A slide that yields no tile (smaller than one tile, bare glass, a speck of tissue below
``min_tissue``) gets status ``empty`` with the reason, and still a valid (0, D) bag: the bag
records the recipe and the reason, so a rerun skips it like any finished slide, ``milkit info``
explains it, and training refuses it by name. Resume skips a complete bag only when it was made
with the same recipe (see :mod:`milkit.feature_extraction.recipe`); any other recipe is refused
naming the differing settings. ``shard`` / torchrun (RANK, WORLD_SIZE) split the sorted slide
list deterministically, and an ``O_CREAT|O_EXCL`` lock per slide keeps two workers from writing
the same bag.

Manifest columns (stable; new ones are only ever appended): ``status`` is the state of the
slide's bag: ``ok`` (tiles encoded), ``empty`` (0-row bag, ``reason`` says why) or ``failed``
(``error`` says why; an existing bag made with another recipe is left untouched). A rerun that
skips a finished slide leaves its row as it is (the run summary counts it as skipped).
``recipe`` holds the recipe as JSON.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.feature_extraction.recipe import (
    bag_recipe,
    build_recipe,
    format_differences,
    recipe_differences,
)
from milkit.io.atomic import atomic_write_text

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
HASH_LIMIT_BYTES = 512 * 1024 * 1024  # hash slides up to 512 MiB; bigger ones get size+mtime


# ---------------------------------------------------------------------------- configuration


@dataclass
class ExtractConfig:
    """Everything ``milkit preprocess`` accepts; the Python API equals the CLI.

    Attributes:
        encoder: registered patch encoder (``fast``, ``resnet50-trunc``, ``uni``, ...).
        weights: local weight file (default: the Hugging Face cache, offline).
        patch_size, mpp, magnification, overlap, min_tissue: the tile spec (see ``TileSpec``).
        tissue_preset: tissue-segmentation preset name; ``tissue_params`` overrides it.
        pen_ink: marker inks to remove (``("blue", "green", "black")``, ``()`` = pen filter off);
            None keeps the preset's (on for every preset). Applied to the tissue parameters, so it
            is recorded in every bag with them.
        batch_size: tiles per encoder batch.
        num_workers: DataLoader reader processes (0 = read in the main process).
        device: ``auto`` (CUDA if present, per-rank under torchrun), ``cpu``, ``cuda:1``, ...
        precision: autocast precision: ``auto`` / ``fp32`` / ``fp16`` / ``bf16``.
        runtime: ``torch``, or an opt-in CPU fast path: ``onnxruntime`` (fp32) or ``openvino``
            (fp32, bf16 on CPUs with native bf16); recorded in the bag and its recipe.
        compile: ``auto`` / ``on`` / ``off``: ``torch.compile`` of the encoder (torch runtime,
            CPU, fp32; ``auto``: once the run reaches 2,000 tiles, see ``PatchEncoder.prepare``).
        dtype: stored feature dtype, ``float32`` or ``float16``.
        shard: ``(i, n)``, 1-based: process every n-th slide starting at the i-th.
        slide_mpp: level-0 µm/px for every slide (overrides metadata).
        mpp_csv: per-slide level-0 µm/px (columns slide_id, mpp).
        overwrite: redo slides whose bag is already complete.
        qc: write ``qc/<slide_id>.png`` thumbnails.
        progress: show tqdm progress bars.
    """

    encoder: str = "fast"
    weights: Path | None = None
    patch_size: int = 256
    mpp: float | None = None
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.25
    tissue_preset: str = "default"
    tissue_params: Any = None
    pen_ink: tuple[str, ...] | None = None
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    runtime: str = "torch"
    compile: str = "auto"
    dtype: str = "float32"
    shard: tuple[int, int] | None = None
    slide_mpp: float | None = None
    mpp_csv: Path | None = None
    overwrite: bool = False
    qc: bool = True
    progress: bool = True

    def tile_spec(self) -> Any:
        from milkit.feature_extraction.tiling import TileSpec

        return TileSpec(
            patch_size=self.patch_size,
            mpp=self.mpp,
            magnification=self.magnification,
            overlap=self.overlap,
            min_tissue=self.min_tissue,
        )

    def tissue(self) -> Any:
        import dataclasses

        from milkit.feature_extraction.tissue import get_preset, parse_pen_ink

        params = (
            self.tissue_params if self.tissue_params is not None else get_preset(self.tissue_preset)
        )
        if self.pen_ink is not None:
            params = dataclasses.replace(params, pen_ink=parse_pen_ink(self.pen_ink))
        return params

    def validate(self) -> None:
        """Check everything that does not need a slide, before any work starts."""
        if self.batch_size < 1:
            raise MilkitError("batch size must be at least 1", value=self.batch_size)
        if self.num_workers < 0:
            raise MilkitError("number of workers must be 0 or more", value=self.num_workers)
        if self.dtype not in ("float32", "float16"):
            raise MilkitError("feature dtype must be float32 or float16", value=self.dtype)
        if self.slide_mpp is not None and self.mpp_csv is not None:
            raise MilkitError(
                "give either --slide-mpp or --mpp-csv, not both",
                value={"slide_mpp": self.slide_mpp, "mpp_csv": str(self.mpp_csv)},
            )
        if self.slide_mpp is not None and not 0.05 <= self.slide_mpp <= 20:
            raise MilkitError("slide mpp must be within 0.05–20 µm/px", value=self.slide_mpp)
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 1 <= i <= n):
                raise MilkitError("shard must be i/n with 1 ≤ i ≤ n", value=f"{i}/{n}")
        self.tile_spec()
        if self.pen_ink is not None:  # canonical order: equal settings, equal recorded recipe
            from milkit.feature_extraction.tissue import parse_pen_ink

            self.pen_ink = parse_pen_ink(self.pen_ink)
        self.tissue()


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


# ---------------------------------------------------------------------------- locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path: Path) -> bool:
    """Create ``path`` with O_CREAT|O_EXCL holding pid/host/time; clear a dead pid's lock.

    Returns False while another live process holds it (or a process on another host).
    """
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _clear_if_stale(path):
                return False
            continue
        with os.fdopen(fd, "w") as fh:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
            fh.write(json.dumps(info))
        return True
    return False


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clear_if_stale(path: Path) -> bool:
    info = read_lock(path)
    if info is None:
        # Being written right now, or garbage: garbage older than a minute is stale.
        try:
            if time.time() - path.stat().st_mtime < 60:
                return False
        except FileNotFoundError:
            return True
    elif info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1))):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def release_lock(path: Path) -> None:
    info = read_lock(path)
    if info is not None and info.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _waiting_lock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    while not acquire_lock(path):
        if time.monotonic() > deadline:
            raise MilkitError(
                "timed out waiting for a lock",
                path=path,
                hint="Another preprocess run holds it; delete the file if no run is active",
            )
        time.sleep(0.05)
    try:
        yield
    finally:
        release_lock(path)


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
    with _waiting_lock(out_dir / (MANIFEST_NAME + ".lock")):
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


# ---------------------------------------------------------------------------- tile reading


class TileDataset:
    """Map-style dataset over a tile grid; each worker opens its own slide handle.

    ``__getitem__`` returns ``(tile uint8 (P, P, 3), ok)``; an undecodable tile gives a white
    tile with ``ok = False`` (the handle is reopened by :class:`Slide`) so the batch goes on.
    """

    def __init__(self, slide_path: Path, mpp: float | None, grid: Any) -> None:
        self.slide_path = slide_path
        self.mpp = mpp
        self.grid = grid
        self.parent_pid = os.getpid()
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.grid)

    def open(self) -> None:
        from milkit.feature_extraction.slides import Slide

        if self._slide is None:
            self._slide = Slide(self.slide_path, mpp=self.mpp)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getitem__(self, i: int) -> tuple[np.ndarray, bool]:
        from milkit.feature_extraction.slides import TileReadError
        from milkit.feature_extraction.tiling import read_tile

        self.open()
        try:
            return read_tile(self._slide, self.grid, i), True
        except TileReadError:
            p = self.grid.patch_size
            return np.full((p, p, 3), 255, dtype=np.uint8), False


def _worker_init(worker_id: int) -> None:
    import cv2
    import torch.utils.data

    cv2.setNumThreads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset._slide = None  # never reuse a handle inherited through fork
        info.dataset.open()
        _exit_with_parent(info.dataset.parent_pid)


def _exit_with_parent(pid: int, interval: float = 1.0) -> None:
    """End this reader when the main process is gone (SIGKILL gives it no chance to say so).

    Workers are children of the fork server, so torch's own parent watchdog does not see
    the main process die.
    """
    import threading

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not _pid_alive(pid):
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="milkit-parent-watch").start()


def _mp_context() -> Any:
    """Reader processes come from a forkserver, never from a fork of this process.

    A plain fork copies whatever threads hold locks here (OpenCV's pool after segmentation,
    glib/OpenSlide, tqdm's monitor), and the child can deadlock on its first read. The fork
    server is single-threaded; its preloaded imports make each new worker start quickly.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cv2", "milkit.feature_extraction.extract"])
    return ctx


def _collate(items: list[tuple[np.ndarray, bool]]) -> tuple[Any, Any]:
    import torch

    tiles = torch.from_numpy(np.stack([t for t, _ in items]))
    ok = torch.tensor([o for _, o in items], dtype=torch.bool)
    return tiles, ok


def encode_grid(
    slide_path: Path,
    mpp: float | None,
    grid: Any,
    encoder: Any,
    *,
    batch_size: int,
    num_workers: int,
    progress: bool = False,
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Encode every tile of ``grid``: (features (N, D) float32, ok (N,) bool, read_s, encode_s).

    ``read_s`` is the time spent waiting for tiles, ``encode_s`` the time inside the encoder.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n = len(grid)
    dim = encoder.cfg.embed_dim
    feats = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return feats, ok, 0.0, 0.0
    dataset = TileDataset(slide_path, mpp, grid)
    workers = min(num_workers, max(1, n // batch_size))
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        multiprocessing_context=_mp_context() if workers else None,
        collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    if hasattr(encoder, "prepare"):
        encoder.prepare(n, batch_size)  # torch.compile for long runs (PatchEncoder.prepare)
    read_s = encode_s = 0.0
    start = 0
    bar = tqdm(total=n, desc=desc, unit="tile", leave=False, disable=not progress)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for tiles, good in loader:
                t1 = time.perf_counter()
                out = encoder.encode(tiles)
                t2 = time.perf_counter()
                read_s += t1 - t0
                encode_s += t2 - t1
                b = tiles.shape[0]
                feats[start : start + b] = out.numpy()
                ok[start : start + b] = good.numpy()
                start += b
                bar.update(b)
                t0 = time.perf_counter()
    finally:
        bar.close()
        dataset.close()
    return feats, ok, read_s, encode_s


# ---------------------------------------------------------------------------- one slide


def slide_fingerprint(path: Path, limit: int = HASH_LIMIT_BYTES) -> dict[str, Any]:
    """``slide_sha256`` for files up to ``limit`` bytes, else size + mtime (hashing is slow)."""
    from milkit.feature_extraction.encoders.registry import file_sha256

    if path.is_file():
        st = path.stat()
        if st.st_size <= limit:
            return {"slide_sha256": file_sha256(path), "slide_size": int(st.st_size)}
        return {"slide_sha256": "None", "slide_size": int(st.st_size), "slide_mtime": st.st_mtime}
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {
        "slide_sha256": "None",
        "slide_size": int(sum(f.stat().st_size for f in files)),
        "slide_mtime": max((f.stat().st_mtime for f in files), default=0.0),
    }


def empty_reason(slide: Any, tissue: Any, grid: Any, spec: Any) -> str:
    """Why ``grid`` holds no tile, in the user's terms (tile size, resolution, min tissue)."""
    from milkit.feature_extraction.tiling import DEFAULT_MPP, plan_tiles

    if spec.magnification is not None:
        at = f"{spec.magnification:.4g}x"
    else:
        at = f"{spec.mpp if spec.mpp is not None else DEFAULT_MPP:.4g} µm/px"
    w0, h0 = slide.dimensions
    ps0 = grid.patch_size_level0
    if w0 < ps0 or h0 < ps0:
        return (
            f"smaller than one {spec.patch_size}-px tile at {at} (slide {w0}x{h0} px at "
            f"{slide.mpp:.4g} µm/px; a tile spans {ps0}x{ps0} level-0 px)"
        )
    if not tissue.mask.any():
        return "no tissue found (bare glass or too faint for the tissue preset)"
    touching = plan_tiles(slide, tissue, dataclasses.replace(spec, min_tissue=0.0))
    area = f"tissue covers {tissue.tissue_area_mm2:.3g} mm²"
    if len(touching) == 0:
        return (
            f"no tissue at min-tissue {spec.min_tissue:g} ({area}, only where no whole tile fits)"
        )
    best = float(touching.tissue_fraction.max())
    return f"no tissue at min-tissue {spec.min_tissue:g} ({area}; the best tile holds {best:.0%})"


def process_slide(
    slide_path: Path,
    out_dir: Path,
    encoder: Any,
    config: ExtractConfig,
    *,
    mpp_override: float | None,
    recipe: dict[str, Any] | None = None,
) -> SlideResult:
    """Segment, tile, encode and write one slide; raises on slide-level failure.

    The result's status is ``ok``, or ``empty`` (with ``reason``) when no tile was planned; a
    slide all of whose tiles are unreadable raises. ``recipe`` is recorded in the bag.
    """
    from milkit.feature_extraction.slides import Slide, TileReadError
    from milkit.feature_extraction.tiling import plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue
    from milkit.io.bags import write_bag

    t_start = time.perf_counter()
    slide_id = slide_id_of(slide_path)
    result = SlideResult(slide_id, str(slide_path), "failed", encoder=encoder.cfg.name)
    if recipe is not None:
        result.recipe = json.dumps(recipe, sort_keys=True)
    with Slide(slide_path, mpp=mpp_override) as slide:
        result.mpp = float(slide.mpp)
        t0 = time.perf_counter()
        params = config.tissue()
        try:
            tissue = segment_tissue(slide, params)
        except TileReadError as err:
            raise MilkitError(
                f"tissue segmentation could not read the slide overview: {err.what}",
                path=slide_path,
                hint="The low-resolution levels are corrupt; re-export or re-scan the slide",
            ) from err
        t1 = time.perf_counter()
        grid = plan_tiles(slide, tissue, config.tile_spec())
        t2 = time.perf_counter()
        result.seg_s, result.tiling_s = t1 - t0, t2 - t1
        result.read_level, result.target_mpp = int(grid.read_level), float(grid.target_mpp)
        coords_attrs = grid.coords_attrs(slide)
        vendor = slide.vendor
        feats, ok, read_s, encode_s = encode_grid(
            slide_path,
            mpp_override,
            grid,
            encoder,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            progress=config.progress,
            desc=slide_id,
        )
        result.read_s, result.encode_s = read_s, encode_s
        n_bad = int((~ok).sum())
        if len(grid) and n_bad == len(grid):
            raise MilkitError(
                f"all {n_bad} tiles of the slide were unreadable",
                path=slide_path,
                hint="The level read for tiles is corrupt; re-export or re-scan the slide",
            )
        result.status = "ok" if len(grid) else "empty"
        result.reason = "" if len(grid) else empty_reason(slide, tissue, grid, config.tile_spec())
        bag_path = out_dir / f"{slide_id}.h5"
        root = {
            "slide_id": slide_id,
            "slide_path": str(slide_path.resolve()),
            **slide_fingerprint(slide_path),
            "vendor": vendor,
            "mpp_source": slide.mpp_source,  # override or the metadata key it was read from
            "tissue_params": params.to_json(),
            "tissue_threshold": float(tissue.threshold),
            "pen_ink_mm2": float(tissue.ink_area_mm2),
            "tile_spec": json.dumps(asdict(config.tile_spec()), sort_keys=True),
            "n_bad_tiles": n_bad,
            "bad_tile_coords": json.dumps(grid.coords[~ok].tolist()),
            "status": result.status,
            "reason": result.reason,
            "recipe": result.recipe or None,
        }
        fattrs = encoder.features_attrs()
        fattrs["precision"] = encoder.precision
        fattrs["storage_dtype"] = config.dtype
        write_bag(
            bag_path,
            feats[ok],
            grid.coords[ok],
            coords_attrs=coords_attrs,
            features_attrs=fattrs,
            root_attrs=root,
            dtype=config.dtype,
        )
        result.n_tiles, result.n_bad_tiles = int(ok.sum()), n_bad
        result.embed_dim = int(encoder.cfg.embed_dim)
        result.bag_path = str(bag_path)
        if config.qc:
            from milkit.feature_extraction.qc import save_qc_thumbnail

            try:
                save_qc_thumbnail(
                    slide,
                    tissue,
                    grid,
                    out_dir / "qc" / f"{slide_id}.png",
                    preset=config.tissue_preset if config.tissue_params is None else "custom",
                )
            except MilkitError as err:  # the bag is fine; report the QC problem only
                result.error = f"QC thumbnail not written: {err}"
    result.total_s = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------- the run


def _mpp_lookup(config: ExtractConfig) -> dict[str, float]:
    if config.mpp_csv is None:
        return {}
    from milkit.feature_extraction.slides import read_mpp_csv

    return read_mpp_csv(config.mpp_csv)


def preprocess(
    slides: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: ExtractConfig | None = None,
) -> RunSummary:
    """Turn slides (files or folders) into bags in ``out_dir``; see the module docstring.

    Returns a :class:`RunSummary`; per-slide failures are recorded there and in
    ``out_dir/manifest.csv`` instead of being raised.
    """
    from tqdm.auto import tqdm

    from milkit.feature_extraction.encoders import create_encoder
    from milkit.io.bags import is_complete_bag
    from milkit.runtime.device import resolve_device

    config = config or ExtractConfig()
    config.validate()
    out_dir = Path(out_dir)
    found = discover_slides(slides)
    index, count = effective_shard(config.shard)
    mine = select_shard(found, index, count)
    mpp_table = _mpp_lookup(config)
    encoder, cfg = create_encoder(
        config.encoder,
        weights=config.weights,
        device=str(resolve_device(config.device)),
        precision=config.precision,
        runtime=config.runtime,
        compile=config.compile,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out_dir)
    ids_seen: dict[str, Path] = {}
    bar = tqdm(mine, desc="slides", unit="slide", disable=not config.progress)
    for slide_path in bar:
        slide_id = slide_id_of(slide_path)
        bar.set_postfix_str(slide_id)
        result = SlideResult(slide_id, str(slide_path), "failed", encoder=cfg.name)
        if slide_id in ids_seen:
            result.error = (
                f"duplicate slide id {slide_id!r}: also {ids_seen[slide_id]}; rename one of them"
            )
            summary.results.append(result)
            continue  # the first slide's row/bag stays untouched
        ids_seen[slide_id] = slide_path
        bag_path = out_dir / f"{slide_id}.h5"
        mpp_override = config.slide_mpp
        if mpp_override is None and mpp_table:
            mpp_override = mpp_table.get(slide_id, mpp_table.get(slide_path.name))
        recipe = build_recipe(
            config,
            weights_sha256=encoder.weights_sha256,
            precision=encoder.precision,
            slide_mpp=mpp_override,
        )
        result.recipe = json.dumps(recipe, sort_keys=True)
        if not config.overwrite and is_complete_bag(bag_path):
            _resume(out_dir, summary, result, bag_path, recipe)
            continue
        lock = out_dir / f"{slide_id}.h5.lock"
        if not acquire_lock(lock):
            summary.skipped_locked.append(slide_id)
            continue
        try:
            result = process_slide(
                slide_path, out_dir, encoder, config, mpp_override=mpp_override, recipe=recipe
            )
        except MilkitError as err:
            result.error = str(err)
        except Exception as err:  # a batch never stops on one bad slide (docs/architecture.md §8)
            result.error = f"{type(err).__name__}: {err}"
        finally:
            release_lock(lock)
        _record(out_dir, summary, result)
    bar.close()
    return summary


def _record(out_dir: Path, summary: RunSummary, result: SlideResult) -> None:
    summary.results.append(result)
    update_manifest(out_dir, asdict(result))


def _resume(
    out_dir: Path,
    summary: RunSummary,
    result: SlideResult,
    bag_path: Path,
    recipe: dict[str, Any],
) -> None:
    """A complete bag exists: skip it if made with ``recipe``, else refuse naming the changes.

    A refusal leaves the bag untouched and records the slide as failed (so training with the
    manifest never mixes two recipes from one folder unknowingly).
    """
    from milkit.io.bags import read_bag_header

    try:
        header = read_bag_header(bag_path)
        old, legacy = bag_recipe(header)
    except (MilkitError, ValueError, TypeError) as err:  # e.g. a hand-edited recipe attribute
        result.error = str(
            MilkitError(
                f"existing bag cannot be compared with this run's settings ({err})",
                path=bag_path,
                hint="Pass --overwrite to redo it, or write to another --out folder",
            )
        )
        _record(out_dir, summary, result)
        return
    diffs = recipe_differences(old, recipe, legacy=legacy)
    if diffs:
        result.error = str(
            MilkitError(
                f"existing bag was made with other settings: {format_differences(diffs)}",
                path=bag_path,
                hint="Pass --overwrite to redo it with the new settings, or write to another "
                "--out folder (the bags of one folder share one recipe)",
            )
        )
        _record(out_dir, summary, result)
        return
    root = header.root_attrs
    bag_status = str(root.get("status", "ok" if header.num_instances else "empty"))
    result.status = "skipped"
    result.n_tiles, result.embed_dim = header.num_instances, header.dim
    result.bag_path = str(bag_path)
    result.reason = str(root.get("reason", "") or "")
    summary.results.append(result)
    previous = read_manifest(out_dir).get(result.slide_id, {})
    if previous.get("status") != bag_status:  # the row describes the bag, not this run
        update_manifest(out_dir, {**asdict(result), "status": bag_status})


__all__ = [
    "MANIFEST_FIELDS",
    "SLIDE_EXTENSIONS",
    "ExtractConfig",
    "RunSummary",
    "SlideResult",
    "acquire_lock",
    "discover_slides",
    "effective_shard",
    "encode_grid",
    "parse_shard",
    "preprocess",
    "process_slide",
    "read_manifest",
    "release_lock",
    "select_shard",
    "slide_id_of",
]
