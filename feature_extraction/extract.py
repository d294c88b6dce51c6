"""Slides → bags: the batch pipeline behind ``milkit preprocess`` (docs/architecture.md §4, §7).

Per slide: open → segment tissue → plan tiles → encode tiles → write ``<slide_id>.h5`` → QC PNG.
Tiles are read by DataLoader workers, each with its own slide handle (opened in
``worker_init_fn``: OpenSlide handles must not cross processes); encoding runs batched under
``torch.inference_mode`` with autocast and channels_last, features are stored as float32
(:mod:`milkit.feature_extraction.encode`). Slide discovery, shards, the manifest and the run
summary are :mod:`milkit.feature_extraction.batch`; the per-slide lock is ``milkit.io.atomic``.

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

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milkit.errors import MilkitError
from milkit.feature_extraction.batch import (
    RunSummary,
    SlideResult,
    discover_slides,
    effective_shard,
    read_manifest,
    select_shard,
    slide_id_of,
    update_manifest,
)
from milkit.feature_extraction.encode import encode_grid
from milkit.feature_extraction.recipe import (
    bag_recipe,
    build_recipe,
    format_differences,
    recipe_differences,
)
from milkit.io.atomic import acquire_lock, release_lock

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
        num_workers: DataLoader reader processes (0 = read in the main process); None: 2,
            or 0 where the encoder runs on CPU on every core (see ``encode.reader_processes``).
        device: ``auto`` (CUDA if present, per-rank under torchrun), ``cpu``, ``cuda:1``, ...
        precision: autocast precision: ``auto`` / ``fp32`` / ``fp16`` / ``bf16``; ``int8``
            with ``runtime="onnxruntime"``.
        runtime: ``torch``, or an opt-in CPU fast path: ``onnxruntime`` (fp32, int8) or
            ``openvino`` (fp32, bf16 on CPUs with native bf16); recorded in the bag and its recipe.
        compile: ``auto`` / ``on`` / ``off``: how the torch runtime runs on CPU in fp32
            (``auto``: resnet50-trunc oneDNN-fused, other encoders ``torch.compile``'d once the
            run reaches 2,000 tiles; see ``PatchEncoder.prepare``).
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
    num_workers: int | None = None
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
        if self.num_workers is not None and self.num_workers < 0:
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


__all__ = ["ExtractConfig", "preprocess", "process_slide"]
