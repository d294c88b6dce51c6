"""Quality-control thumbnails: the slide overview with the tissue outline and the tile grid.

One PNG per slide lets a user check segmentation and tiling at a glance (CLAM's ``masks/`` and
``stitches/`` images, TRIDENT's ``contours/`` overlays serve the same purpose).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from milkit.feature_extraction.tiling import TileGrid
from milkit.feature_extraction.tissue import TissueMask

from milkit.atomic import atomic_path
from milkit.errors import MilkitError

TISSUE_RGB = (0, 170, 0)  # tissue outline
HOLE_RGB = (0, 90, 255)  # holes inside tissue
TILE_RGB = (255, 40, 40)  # tile borders


def draw_qc(
    thumb: np.ndarray,
    level0_size: tuple[int, int],
    tissue: TissueMask,
    grid: TileGrid | None,
) -> np.ndarray:
    """Draw tissue contours (green, holes blue) and tile boxes (red) on an RGB thumbnail."""
    img = np.ascontiguousarray(thumb.copy())
    th, tw = img.shape[:2]
    w0, h0 = level0_size
    sx, sy = tw / w0, th / h0  # thumbnail px per level-0 px
    line = max(1, round(max(tw, th) / 800))
    if tissue.mask.any():
        contours, hierarchy = cv2.findContours(
            tissue.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
        )
        mx = tissue.downsample[0] * sx  # thumbnail px per mask px
        my = tissue.downsample[1] * sy
        for i, contour in enumerate(contours):
            pts = contour.astype(np.float64)
            pts[..., 0] = (pts[..., 0] + 0.5) * mx
            pts[..., 1] = (pts[..., 1] + 0.5) * my
            is_hole = hierarchy is not None and hierarchy[0][i][3] >= 0
            colour = HOLE_RGB if is_hole else TISSUE_RGB
            cv2.polylines(img, [np.round(pts).astype(np.int32)], True, colour, line, cv2.LINE_AA)
    if grid is not None and len(grid.coords):
        size = grid.patch_size_level0
        x0 = np.round(grid.coords[:, 0] * sx).astype(np.int64)
        y0 = np.round(grid.coords[:, 1] * sy).astype(np.int64)
        x1 = np.round((grid.coords[:, 0] + size) * sx).astype(np.int64) - 1
        y1 = np.round((grid.coords[:, 1] + size) * sy).astype(np.int64) - 1
        tile_line = 1 if min(size * sx, size * sy) < 12 else line
        for a, b, c, d in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist()):
            cv2.rectangle(img, (a, b), (max(a, c), max(b, d)), TILE_RGB, tile_line)
    return img


def save_qc_thumbnail(
    slide: Any,
    tissue: TissueMask,
    grid: TileGrid | None,
    out_path: str | Path,
    max_size: int = 1024,
) -> Path:
    """Write the QC PNG for ``slide`` to ``out_path`` atomically; returns the path."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise MilkitError(
            "QC thumbnails are PNG files",
            value=out_path.suffix,
            path=out_path,
            hint="Use a .png file name",
        )
    thumb = slide.thumbnail(max_size)
    img = draw_qc(thumb, slide.dimensions, tissue, grid)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image as PNG
        raise MilkitError("could not encode the QC thumbnail", path=out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return out_path
