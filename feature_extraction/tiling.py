"""Tile grids at a target resolution: level-0 coordinates of tissue tiles, in raster order.

Geometry (TRIDENT's ``WSIPatcher`` conventions, re-derived): the target resolution is given by
mpp or by magnification; ``target_downsample`` = level-0 px per output px. A tile of
``patch_size`` output px spans ``patch_size_level0 = round(patch_size · target_downsample)``
level-0 px, and neighbours are ``patch_size_level0 − overlap_level0`` apart. Pixels are read from
the lowest-resolution pyramid level whose downsample does not exceed the target (2 % tolerance, so
a 4.016 level serves a 4× target) and resized to ``patch_size``. Tiles that would cross the slide
edge are dropped; the tissue fraction of every candidate comes from one summed-area table of the
tissue mask (exact box integrals, no per-tile loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.feature_extraction.coverage import box_coverage, summed_area_table
from milkit.feature_extraction.tissue import TissueMask

DEFAULT_MPP = 0.5  # 20x under the 10 µm/px ⇔ 1x convention
LEVEL_TOLERANCE = 0.02  # a pyramid level up to 2 % finer/coarser than the target still counts
COORDS_FRAME = "level0_px_top_left"


@dataclass(frozen=True)
class TileSpec:
    """What tiles to cut: output size, target resolution, overlap, minimum tissue fraction.

    Exactly one of ``mpp`` / ``magnification`` may be given; with neither the target is 20x
    (0.5 µm/px). ``overlap`` is in output pixels (TRIDENT's convention). ``min_tissue`` = 0 keeps
    every tile touching tissue; otherwise a tile needs at least that fraction covered.
    """

    patch_size: int = 256
    mpp: float | None = None
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, (int, np.integer)):
            raise MilkitError(
                "patch_size must be an integer number of pixels", value=self.patch_size
            )
        if not 8 <= self.patch_size <= 16384:
            raise MilkitError("patch_size must be within 8–16384 px", value=self.patch_size)
        if self.mpp is not None and self.magnification is not None:
            raise MilkitError(
                "give either a target mpp or a target magnification, not both",
                value={"mpp": self.mpp, "magnification": self.magnification},
                hint="Use --mpp OR --magnification",
            )
        if self.mpp is not None and not (
            isinstance(self.mpp, (int, float)) and 0.05 <= self.mpp <= 100
        ):
            raise MilkitError("target mpp must be within 0.05–100 µm/px", value=self.mpp)
        if self.magnification is not None and not (
            isinstance(self.magnification, (int, float)) and 0.1 <= self.magnification <= 200
        ):
            raise MilkitError(
                "target magnification must be within 0.1–200", value=self.magnification
            )
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, np.integer)):
            raise MilkitError("overlap must be an integer number of pixels", value=self.overlap)
        if not 0 <= self.overlap < self.patch_size:
            raise MilkitError(
                "overlap must be at least 0 and smaller than patch_size",
                value=self.overlap,
                hint=f"patch_size is {self.patch_size}",
            )
        if not (isinstance(self.min_tissue, (int, float)) and 0.0 <= self.min_tissue <= 1.0):
            raise MilkitError("min_tissue must be a fraction within 0–1", value=self.min_tissue)

    def target_downsample(self, slide_mpp: float, slide_magnification: float) -> float:
        """Level-0 px per output px for a slide with the given level-0 mpp / magnification."""
        if self.magnification is not None:
            return float(slide_magnification) / float(self.magnification)
        target = DEFAULT_MPP if self.mpp is None else float(self.mpp)
        return target / float(slide_mpp)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide; ``coords`` are level-0 top-left (x, y), sorted by y then x."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    read_level: int
    read_size: int
    patch_size: int
    patch_size_level0: int
    step_level0: int
    target_mpp: float
    target_magnification: float
    target_downsample: float
    custom_downsample: float
    overlap: int
    spec: TileSpec
    level0_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.coords)

    def coords_attrs(self, slide: Any) -> dict[str, Any]:
        """``coords`` dataset attributes: TRIDENT's set + CLAM's set + ours (docs/architecture.md §4)."""
        w0, h0 = slide.dimensions
        level_w, level_h = slide.level_dimensions[self.read_level]
        return {
            # TRIDENT
            "patch_size": int(self.patch_size),
            "patch_size_level0": int(self.patch_size_level0),
            "level0_magnification": float(slide.magnification),
            "target_magnification": float(self.target_magnification),
            "overlap": int(self.overlap),
            "name": str(slide.slide_id),
            "level0_width": int(w0),
            "level0_height": int(h0),
            # CLAM
            "patch_level": int(self.read_level),
            "downsample": np.array([w0 / level_w, h0 / level_h], dtype=np.float64),
            "level_dim": np.array([level_w, level_h], dtype=np.int64),
            "downsampled_level_dim": np.array([level_w, level_h], dtype=np.int64),
            # ours
            "mpp_level0": float(slide.mpp),
            "target_mpp": float(self.target_mpp),
            "custom_downsample": float(self.custom_downsample),
            "coords_frame": COORDS_FRAME,
            "read_size": int(self.read_size),
            "step_level0": int(self.step_level0),
            "min_tissue": float(self.spec.min_tissue),
        }


def choose_read_level(level_downsamples: tuple[float, ...] | list[float], target_ds: float) -> int:
    """Lowest-resolution level whose downsample ≤ target (with :data:`LEVEL_TOLERANCE`)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= target_ds * (1 + LEVEL_TOLERANCE) and ds >= level_downsamples[best]:
            best = i
    return best


def plan_tiles(slide: Any, tissue: TissueMask, spec: TileSpec = TileSpec()) -> TileGrid:
    """Plan the tissue tiles of ``slide`` at ``spec``'s resolution (see the module docstring)."""
    w0, h0 = slide.dimensions
    slide_mpp = float(slide.mpp)
    slide_mag = float(slide.magnification)
    target_ds = spec.target_downsample(slide_mpp, slide_mag)
    if target_ds < 1 - LEVEL_TOLERANCE:
        raise MilkitError(
            f"target resolution is finer than the scan of slide {slide.slide_id!r} "
            f"(would upsample ×{1 / target_ds:.2f})",
            value={"target_mpp": slide_mpp * target_ds, "slide_mpp": slide_mpp},
            path=getattr(slide, "path", None),
            hint="Choose a coarser --mpp / lower --magnification for this slide",
        )
    if abs(target_ds - 1) <= LEVEL_TOLERANCE:
        target_ds = 1.0  # e.g. 0.499 µm/px scans at 0.5: read native pixels, no resize
    level = choose_read_level(slide.level_downsamples, target_ds)
    level_ds = float(slide.level_downsamples[level])
    ratio = target_ds / level_ds
    if abs(ratio - 1) <= LEVEL_TOLERANCE:
        ratio = 1.0  # a level within tolerance of the target is read 1:1
    read_size = max(1, round(spec.patch_size * ratio))
    effective_ds = level_ds * read_size / spec.patch_size
    ps0 = max(1, round(spec.patch_size * effective_ds))
    overlap0 = round(spec.overlap * effective_ds)
    step0 = max(1, ps0 - overlap0)

    nx = (w0 - ps0) // step0 + 1 if w0 >= ps0 else 0
    ny = (h0 - ps0) // step0 + 1 if h0 >= ps0 else 0
    if nx > 0 and ny > 0:
        ys, xs = np.meshgrid(
            np.arange(ny, dtype=np.int64) * step0,
            np.arange(nx, dtype=np.int64) * step0,
            indexing="ij",
        )
        candidates = np.stack([xs.ravel(), ys.ravel()], axis=1)  # y-major: raster order
        sat = summed_area_table(tissue.mask)
        frac = box_coverage(tissue.mask, tissue.downsample, candidates, ps0, sat=sat)
        keep = frac > 0 if spec.min_tissue <= 0 else frac >= np.float32(spec.min_tissue) - 1e-6
        coords = candidates[keep]
        fractions = frac[keep]
    else:
        coords = np.zeros((0, 2), dtype=np.int64)
        fractions = np.zeros(0, dtype=np.float32)
    target_mpp = slide_mpp * effective_ds
    return TileGrid(
        coords=np.ascontiguousarray(coords, dtype=np.int64),
        tissue_fraction=fractions.astype(np.float32),
        read_level=level,
        read_size=int(read_size),
        patch_size=int(spec.patch_size),
        patch_size_level0=int(ps0),
        step_level0=int(step0),
        target_mpp=float(target_mpp),
        target_magnification=float(slide_mag / effective_ds),
        target_downsample=float(effective_ds),
        custom_downsample=float(read_size / spec.patch_size),
        overlap=int(spec.overlap),
        spec=spec,
        level0_size=(int(w0), int(h0)),
    )


def read_tile(slide: Any, grid: TileGrid, i: int) -> np.ndarray:
    """(patch_size, patch_size, 3) uint8 RGB of tile ``i``, read at ``grid.read_level`` and
    area-resized; raises :class:`feature_extraction.slides.TileReadError` on a corrupt tile."""
    import cv2

    x, y = (int(v) for v in grid.coords[i])
    img = slide.read_region((x, y), grid.read_level, (grid.read_size, grid.read_size))
    if grid.read_size != grid.patch_size:
        interp = cv2.INTER_AREA if grid.read_size > grid.patch_size else cv2.INTER_LINEAR
        img = cv2.resize(img, (grid.patch_size, grid.patch_size), interpolation=interp)
    return img


def expected_tile_count(w0: int, h0: int, ps0: int, step0: int) -> int:
    """Number of grid positions (before the tissue filter) that fit inside the slide."""
    if w0 < ps0 or h0 < ps0:
        return 0
    return ((w0 - ps0) // step0 + 1) * ((h0 - ps0) // step0 + 1)


__all__ = [
    "COORDS_FRAME",
    "DEFAULT_MPP",
    "TileGrid",
    "TileSpec",
    "choose_read_level",
    "expected_tile_count",
    "plan_tiles",
    "read_tile",
]
