"""PNG figures of an exact pixel size, shared by the QC thumbnails and the heatmaps.

Each figure has its own Agg canvas (pyplot's global state and the caller's backend are never
touched), is saved atomically at its own size, and sizes its text relative to the picture
(:func:`font_px`), so text stays readable from 300 px thumbnails to 2,000 px slides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from milkit.io.atomic import atomic_path

_DPI = 100.0  # figure dpi: 1 figure inch = 100 PNG pixels; font points = px * 72 / dpi
MIN_FONT_PX = 12  # smallest text height in PNG pixels


def font_px(width: int, height: int) -> int:
    """Text height in pixels for a picture of ``width`` × ``height`` px: 1/60 of its longer side,
    at least :data:`MIN_FONT_PX`, at most 64 (e.g. 12 px up to 720 px, 33 px at 2,000 px)."""
    return int(min(64, max(MIN_FONT_PX, round(max(width, height) / 60))))


def new_figure(width_px: int, height_px: int) -> Any:
    """A matplotlib Figure of exactly ``width_px`` × ``height_px`` PNG pixels with an Agg canvas
    of its own (pyplot's global state and the caller's backend are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG atomically at its own size (no tight bounding box, no resampling)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    return path


def points(px: float) -> float:
    """Font size in points that is ``px`` PNG pixels tall in a :func:`new_figure`."""
    return px * 72.0 / _DPI


__all__ = ["MIN_FONT_PX", "font_px", "new_figure", "points", "save_figure"]
