"""Quality-control thumbnails: the slide overview with the tissue outline, the tile grid, the
marker ink that was removed, and a header saying what was done.

One PNG per slide lets a user check segmentation and tiling at a glance (CLAM's ``masks/`` and
``stitches/`` images, TRIDENT's ``contours/`` overlays serve the same purpose). Like TRIDENT's
patch visualisation (``WSIPatcher.visualize``: tile count, level-0 size, mpp and magnification,
patch size and overlap at the target), the header names the slide, the tiles, level-0 and target
resolution, the tile size, the tissue preset and the pen-ink area removed, with a legend of the
overlay colours. Text is drawn with matplotlib on a Figure of its own (never pyplot, never the
caller's backend), sized relative to the image (:func:`milkit.io.figures.font_px`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from milkit.errors import MilkitError
from milkit.feature_extraction.tiling import TileGrid
from milkit.feature_extraction.tissue import TissueMask

TISSUE_RGB = (0, 170, 0)  # tissue outline
HOLE_RGB = (0, 90, 255)  # holes inside tissue
TILE_RGB = (255, 40, 40)  # tile borders
INK_RGB = (255, 0, 255)  # marker ink removed from the tissue (outline + translucent fill)
_INK_FILL_ALPHA = 0.35


def _scaled_contours(
    mask: np.ndarray, downsample: tuple[float, float], sx: float, sy: float, mode: int
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Contours of ``mask`` in thumbnail pixels (int32) and OpenCV's hierarchy."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), mode, cv2.CHAIN_APPROX_SIMPLE)
    mx = downsample[0] * sx  # thumbnail px per mask px
    my = downsample[1] * sy
    out = []
    for contour in contours:
        pts = contour.astype(np.float64)
        pts[..., 0] = (pts[..., 0] + 0.5) * mx
        pts[..., 1] = (pts[..., 1] + 0.5) * my
        out.append(np.round(pts).astype(np.int32))
    return out, hierarchy


def draw_qc(
    thumb: np.ndarray,
    level0_size: tuple[int, int],
    tissue: TissueMask,
    grid: TileGrid | None,
) -> np.ndarray:
    """Draw tissue contours (green, holes blue), removed marker ink (magenta, filled) and tile
    boxes (red) on an RGB thumbnail; returns a new (H, W, 3) uint8 image of the same size."""
    img = np.ascontiguousarray(thumb.copy())
    th, tw = img.shape[:2]
    w0, h0 = level0_size
    sx, sy = tw / w0, th / h0  # thumbnail px per level-0 px
    line = max(1, round(max(tw, th) / 800))
    ink = tissue.ink
    if ink is not None and ink.any():
        polys, _ = _scaled_contours(ink, tissue.downsample, sx, sy, cv2.RETR_CCOMP)
        fill = img.copy()
        cv2.drawContours(fill, polys, -1, INK_RGB, thickness=cv2.FILLED)
        cv2.addWeighted(fill, _INK_FILL_ALPHA, img, 1 - _INK_FILL_ALPHA, 0, dst=img)
        cv2.polylines(img, polys, True, INK_RGB, line, cv2.LINE_AA)
    if tissue.mask.any():
        polys, hierarchy = _scaled_contours(tissue.mask, tissue.downsample, sx, sy, cv2.RETR_CCOMP)
        for i, pts in enumerate(polys):
            is_hole = hierarchy is not None and hierarchy[0][i][3] >= 0
            colour = HOLE_RGB if is_hole else TISSUE_RGB
            cv2.polylines(img, [pts], True, colour, line, cv2.LINE_AA)
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


def qc_lines(
    slide: Any, tissue: TissueMask, grid: TileGrid | None, preset: str | None = None
) -> list[str]:
    """The header text of a QC image: slide id first, then one fact per line."""
    w0, h0 = (int(v) for v in slide.dimensions)
    lines = [str(getattr(slide, "slide_id", "slide"))]
    if grid is not None:
        lines.append(
            f"{len(grid)} tiles of {grid.patch_size} px (overlap {grid.overlap}) at "
            f"{grid.target_mpp:.3g} µm/px ({grid.target_magnification:.3g}×), "
            f"min tissue {grid.spec.min_tissue:g}"
        )
    else:
        lines.append("no tiles planned")
    lines.append(
        f"level 0: {w0} × {h0} px at {float(slide.mpp):.4g} µm/px "
        f"({float(slide.magnification):.3g}×)"
    )
    lines.append(
        f"tissue preset: {preset or 'custom'}; tissue {tissue.tissue_area_mm2:.3g} mm² "
        f"({100 * tissue.tissue_fraction:.1f} % of the slide)"
    )
    inks = tissue.params.pen_ink
    if inks:
        lines.append(f"pen ink removed: {tissue.ink_area_mm2:.3g} mm² (filter: {', '.join(inks)})")
    else:
        lines.append("pen ink filter: off")
    return lines


def qc_figure(image: np.ndarray, lines: list[str]) -> Any:
    """A Figure: ``lines`` (first one as the title) and the colour legend above ``image``.

    ``image`` is drawn unresampled at the bottom left, so the PNG's last H rows and first W
    columns are exactly ``image``. Text is :func:`milkit.io.figures.font_px` tall.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from milkit.io.figures import font_px, new_figure, points

    h, w = image.shape[:2]
    fs = font_px(w, h)
    pad = round(0.5 * fs)
    legend = [
        (Line2D([], [], color=np.array(TISSUE_RGB) / 255, lw=max(1.5, fs / 8)), "tissue outline"),
        (Line2D([], [], color=np.array(HOLE_RGB) / 255, lw=max(1.5, fs / 8)), "hole in tissue"),
        (Patch(facecolor="none", edgecolor=np.array(TILE_RGB) / 255, lw=max(1.5, fs / 8)), "tile"),
        (
            Patch(
                facecolor=np.array(INK_RGB) / 255,
                alpha=0.6,
                edgecolor=np.array(INK_RGB) / 255,
            ),
            "pen ink removed",
        ),
    ]
    # Width: the image, but never so narrow that a header line is cut off (~0.55 em per char).
    longest = max(len(t) for t in lines[1:]) if len(lines) > 1 else 0
    width = max(w, round(0.56 * fs * max(longest, 1.2 * len(lines[0]))) + 2 * pad, 24 * fs)
    legend_cols = 4 if width >= 50 * fs else 2
    legend_rows = -(-len(legend) // legend_cols)
    header = round(pad + 1.6 * fs + 1.45 * fs * (len(lines) - 1) + 1.6 * fs * legend_rows + pad)
    fig = new_figure(width, h + header)
    total_h = h + header
    fig.figimage(image, xo=0, yo=0, origin="upper", resize=False)
    y = pad
    fig.text(
        pad / width,
        1 - y / total_h,
        lines[0],
        fontsize=points(1.25 * fs),
        fontweight="bold",
        va="top",
        ha="left",
    )
    y += 1.6 * fs
    for text in lines[1:]:
        fig.text(pad / width, 1 - y / total_h, text, fontsize=points(fs), va="top", ha="left")
        y += 1.45 * fs
    fig.legend(
        [h_ for h_, _ in legend],
        [t for _, t in legend],
        loc="upper left",
        bbox_to_anchor=(pad / width, 1 - y / total_h),
        ncol=legend_cols,
        fontsize=points(fs),
        frameon=False,
        borderaxespad=0.0,
        borderpad=0.0,
        handlelength=1.6,
        columnspacing=1.2,
    )
    return fig


def save_qc_thumbnail(
    slide: Any,
    tissue: TissueMask,
    grid: TileGrid | None,
    out_path: str | Path,
    max_size: int = 1024,
    *,
    preset: str | None = None,
) -> Path:
    """Write the QC PNG for ``slide`` to ``out_path`` atomically; returns the path.

    The PNG is the overlay of :func:`draw_qc` on a ``max_size`` thumbnail (its bottom-left
    block, unresampled) under a header from :func:`qc_lines` and a colour legend. ``preset`` is
    the tissue preset's name (None: "custom").
    """
    from milkit.io.figures import save_figure

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
    fig = qc_figure(img, qc_lines(slide, tissue, grid, preset))
    return save_figure(fig, out_path)
