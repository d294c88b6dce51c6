"""Attention / instance-score heatmaps painted back onto the slide thumbnail (docs/architecture.md §5).

Each tile's score fills the thumbnail rectangle of the tile (level-0 coords x thumbnail scale),
overlapping tiles are averaged, the colour-mapped scores are alpha-blended over the thumbnail,
and a colour bar is drawn in a panel to the right. The heatmap occupies exactly the top-left
``thumbnail`` pixels of the PNG (so pixel positions match the thumbnail); an optional title goes
in a band below it. The picture is composed on a matplotlib ``Figure`` with its own Agg canvas
(never pyplot, never the caller's backend); text scales with the image (:func:`font_px`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.io.bags import bag_patch_size_level0, positive_attr, read_bag_coords
from milkit.io.figures import font_px, new_figure, points, save_figure

NORMALIZE = ("minmax", "rank", "none")
_PANEL_WIDTH = 90  # px right of the heatmap at the smallest font: colour bar + tick labels
_MIN_HEIGHT = 160  # canvas height floor so the colour bar stays readable on tiny thumbnails
_BLANK_GREY = 235  # background of the blank canvas used without a slide


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise MilkitError("thumbnail must be an (H, W, 3) RGB image", value=img.shape)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _as_scores(scores: Any, n: int) -> np.ndarray:
    s = scores.detach().float().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == n and s.shape[0] != n:
        s = s.mean(axis=0)  # multi-head attention (H, N): average over heads
    s = s.reshape(-1) if s.ndim == 2 and 1 in s.shape else s
    if s.shape != (n,):
        raise MilkitError(f"need one score per tile ({n} coords)", value=s.shape)
    return s


def _normalise(
    scores: np.ndarray, mode: str, vmin: float | None, vmax: float | None
) -> tuple[np.ndarray, tuple[str, str, str]]:
    """Scores mapped to [0, 1] and the colour-bar labels (bottom, middle, top)."""
    finite = np.isfinite(scores)
    if mode == "rank":
        # percentile of each tile among the tiles (CLAM's default heatmap scaling)
        order = scores[finite].argsort(kind="stable").argsort()
        out = np.full(scores.shape, np.nan)
        out[finite] = (order + 0.5) / max(1, finite.sum())
        return out, ("0%", "50%", "100%")
    if mode == "none":
        lo, hi = 0.0 if vmin is None else vmin, 1.0 if vmax is None else vmax
    elif mode == "minmax":
        lo = float(np.min(scores[finite])) if vmin is None and finite.any() else (vmin or 0.0)
        hi = float(np.max(scores[finite])) if vmax is None and finite.any() else (vmax or 1.0)
    else:
        raise MilkitError(f"normalize must be one of {list(NORMALIZE)}", value=mode)
    span = hi - lo
    out = np.clip((scores - lo) / span, 0.0, 1.0) if span > 0 else np.full(scores.shape, 0.5)
    return out, (f"{lo:.3g}", f"{(lo + hi) / 2:.3g}", f"{hi:.3g}")


def _score_canvas(
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: float,
    level0_dims: tuple[int, int],
    shape: tuple[int, int],
) -> np.ndarray:
    """(H, W) mean score per thumbnail pixel, NaN where no tile lies."""
    h, w = shape
    w0, h0 = level0_dims
    sx, sy = w / w0, h / h0
    x0 = np.floor(coords[:, 0] * sx).astype(np.int64)
    y0 = np.floor(coords[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.ceil((coords[:, 0] + patch_size_level0) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.ceil((coords[:, 1] + patch_size_level0) * sy).astype(np.int64))
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    keep = np.isfinite(values) & (x1 > x0) & (y1 > y0)
    x0, x1, y0, y1, v = x0[keep], x1[keep], y0[keep], y1[keep], values[keep]
    # Rectangle sums via a 2-D difference array and two cumulative sums: O(N + H*W) instead of
    # one slice per tile (10^5 tiles on a 2048 px thumbnail: ~0.1 s instead of ~10 s).
    size, stride = (h + 1) * (w + 1), w + 1
    corners = np.concatenate(
        [y0 * stride + x0, y0 * stride + x1, y1 * stride + x0, y1 * stride + x1]
    )
    signs = np.concatenate([np.ones_like(v), -np.ones_like(v), -np.ones_like(v), np.ones_like(v)])
    planes = []
    for weights in (signs * np.tile(v, 4), signs):
        arr = np.bincount(corners, weights=weights, minlength=size).reshape(h + 1, w + 1)
        np.cumsum(arr, axis=0, out=arr)
        np.cumsum(arr, axis=1, out=arr)
        planes.append(arr[:h, :w])
    acc, cnt = planes[0], np.rint(planes[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.round(acc / np.maximum(cnt, 1), 9)  # drop cumulative-sum round-off
    return np.where(cnt > 0, mean, np.nan)


def draw_heatmap(
    thumbnail_rgb: np.ndarray,
    coords: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    patch_size_level0: float,
    level0_dims: tuple[int, int],
    out_png: str | os.PathLike[str],
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    normalize: str = "minmax",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "score",
) -> Path:
    """Paint per-tile scores onto a thumbnail and write a PNG with a colour bar (atomic).

    Args:
        thumbnail_rgb: (H, W, 3) uint8 overview of the slide.
        coords: (N, 2) level-0 (x, y) top-left corners of the tiles (the bag's ``coords``).
        scores: (N,) per-tile scores (attention, instance probability); (heads, N) is averaged.
            NaN scores are left unpainted.
        patch_size_level0: tile side in level-0 pixels.
        level0_dims: (width, height) of level 0, to scale coords onto the thumbnail.
        out_png: output file.
        cmap: matplotlib colour map name.
        alpha: opacity of the colour over the thumbnail (0..1).
        title: drawn in a band below the heatmap.
        normalize: ``minmax`` (scores → [0, 1] between their min and max, or ``vmin``/``vmax``),
            ``rank`` (percentile among tiles, CLAM's scaling) or ``none`` (clip to
            ``[vmin or 0, vmax or 1]``).
        label: colour-bar caption.

    Returns the PNG path. The heatmap is the top-left (H, W) block of the image.
    """
    fig = heatmap_figure(
        thumbnail_rgb,
        coords,
        scores,
        patch_size_level0,
        level0_dims,
        cmap=cmap,
        alpha=alpha,
        title=title,
        normalize=normalize,
        vmin=vmin,
        vmax=vmax,
        label=label,
    )
    return save_figure(fig, out_png)


def heatmap_figure(
    thumbnail_rgb: np.ndarray,
    coords: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    patch_size_level0: float,
    level0_dims: tuple[int, int],
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    normalize: str = "minmax",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "score",
) -> Any:
    """The matplotlib Figure :func:`draw_heatmap` saves (same arguments, no output path).

    Its size in pixels is the PNG's; the heatmap is drawn unresampled at the top left, the colour
    bar (ticks and ``label``) on the right and ``title`` below, in text :func:`font_px` tall.
    """
    import matplotlib
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import Normalize

    thumb = _as_rgb(thumbnail_rgb)
    h, w = thumb.shape[:2]
    crd = np.asarray(coords, dtype=np.float64)
    if crd.ndim != 2 or crd.shape[1] != 2:
        raise MilkitError("coords must have shape (N, 2)", value=crd.shape)
    values = _as_scores(scores, len(crd))
    if not patch_size_level0 or patch_size_level0 <= 0:
        raise MilkitError("patch_size_level0 must be positive", value=patch_size_level0)
    w0, h0 = (int(v) for v in level0_dims)
    if w0 <= 0 or h0 <= 0:
        raise MilkitError("level0_dims must be positive (width, height)", value=level0_dims)
    if not 0.0 <= alpha <= 1.0:
        raise MilkitError("alpha must be in [0, 1]", value=alpha)
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise MilkitError("unknown matplotlib colour map", value=cmap) from err

    norm, tick_labels = _normalise(values, normalize, vmin, vmax)
    canvas = _score_canvas(crd, norm, float(patch_size_level0), (w0, h0), (h, w))
    painted = np.isfinite(canvas)
    # colour of each painted pixel through the map's 256-entry table, with matplotlib's own
    # float -> index rule (floor(x * N), 1.0 -> N - 1)
    # (whole-image float32 arithmetic: ~5x faster than boolean-mask indexing of (H, W, 3))
    lut = colormap(np.arange(colormap.N))[:, :3].astype(np.float32) * np.float32(255 * alpha)
    index = np.nan_to_num(canvas * colormap.N).astype(np.int32)
    np.clip(index, 0, colormap.N - 1, out=index)
    mixed = thumb.astype(np.float32) * np.float32(1 - alpha)
    mixed += lut[index]
    np.rint(mixed, out=mixed)
    np.clip(mixed, 0, 255, out=mixed)
    heat = np.where(painted[..., None], mixed.astype(np.uint8), thumb)

    fs = font_px(w, h)
    # panel: gap, bar, tick, pad, then the widest tick label or the caption (DejaVu Sans digits
    # are ~0.64 em wide); never narrower than the smallest-font panel
    text_chars = max(max(len(t) for t in tick_labels) + 4, len(label[:14]))
    panel = max(_PANEL_WIDTH, math.ceil(fs * (0.8 + 0.66 * text_chars)) + 6)
    body_h = max(h, _MIN_HEIGHT, 10 * fs)
    title_h = round(2.0 * fs) if title else 0
    total_w, total_h = w + panel, body_h + title_h
    fig = new_figure(total_w, total_h)
    # origin="upper": row 0 of the array is the top row, placed yo px above the bottom edge
    fig.figimage(heat, xo=0, yo=total_h - h, origin="upper", resize=False)
    bar_x, bar_w = w + round(0.8 * fs), round(1.4 * fs)
    bar_top, bar_bottom = round(2.2 * fs), body_h - round(1.0 * fs)
    cax = fig.add_axes(
        (
            bar_x / total_w,
            1 - bar_bottom / total_h,
            bar_w / total_w,
            (bar_bottom - bar_top) / total_h,
        )
    )
    bar = Colorbar(cax, cmap=colormap, norm=Normalize(0.0, 1.0), ticks=[0.0, 0.5, 1.0])
    bar.set_ticklabels(list(tick_labels))
    cax.tick_params(labelsize=points(fs), length=fs / 3, width=max(1.0, fs / 12))
    bar.outline.set_linewidth(max(1.0, fs / 12))
    fig.text(
        bar_x / total_w,
        1 - round(0.4 * fs) / total_h,
        label[:14],
        fontsize=points(fs),
        ha="left",
        va="top",
    )
    if title:
        fig.text(
            round(0.4 * fs) / total_w,
            (title_h / 2) / total_h,
            title,
            fontsize=points(fs),
            ha="left",
            va="center",
        )
    return fig


def _recorded(value: Any) -> str | None:
    """An attribute as text, None when absent or spelled as missing ("None", "", NaN)."""
    if value is None:
        return None
    text = str(value.decode() if isinstance(value, bytes) else value).strip()
    return None if text.lower() in ("", "none", "null", "nan") else text


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so a check repeated in one run is free."""
    from milkit.feature_extraction.encoders.registry import file_sha256

    return file_sha256(path)


def check_slide_matches_bag(
    bag_path: str | os.PathLike[str],
    slide_path: str | os.PathLike[str],
    level0_dims: tuple[int, int],
    *,
    allow_mismatch: bool = False,
    patch_size_level0: float | None = None,
    hash_limit: int | None = None,
) -> list[str]:
    """Refuse to draw a bag's tiles on a slide it was not made from.

    What is compared, cheapest first:

    - level-0 size (always, never overridable: coords are level-0 pixels of the bag's slide) with
      the bag's ``level0_width``/``level0_height`` (milkit, TRIDENT); CLAM bags record none, so
      their tiles must at least lie inside the slide;
    - slide id: the bag's ``slide_id`` (TRIDENT: ``name``) with the slide file's id (its stem,
      or the DICOM folder's name);
    - content: the file size, then the SHA-256 the bag recorded, hashed only when the file is
      at most ``hash_limit`` bytes (default: the 512 MiB up to which ``preprocess`` records a
      hash, ~1 s per 500 MB); bigger slides were recorded by size alone.

    Returns notes for the caller to print (the mismatches let through by ``allow_mismatch``, for
    renamed or re-saved copies of the slide). Raises MilkitError naming both sides otherwise.
    """
    from milkit.feature_extraction.batch import slide_id_of
    from milkit.feature_extraction.extract import HASH_LIMIT_BYTES
    from milkit.io.bags import read_bag_header

    bag_path, slide_path = Path(bag_path), Path(slide_path)
    header = read_bag_header(bag_path)
    root, cattrs = header.root_attrs, header.coords_attrs
    w0, h0 = (int(v) for v in level0_dims)
    rw, rh = _recorded(cattrs.get("level0_width")), _recorded(cattrs.get("level0_height"))
    bag_id = _recorded(root.get("slide_id")) or _recorded(cattrs.get("name"))
    bag_side = f"bag {bag_path.name} (slide {bag_id or '?'}"
    if rw is not None and rh is not None:
        bag_side += f", {int(float(rw))} × {int(float(rh))} px"
        if (int(float(rw)), int(float(rh))) != (w0, h0):
            raise MilkitError(
                f"{bag_side}) was made from another slide than {slide_path.name} "
                f"({w0} × {h0} px): level-0 sizes differ",
                path=slide_path,
                hint="Tile coordinates are level-0 pixels of the bag's own slide; pass that "
                "slide (no override exists for a different size)",
            )
    elif header.has_coords and header.num_instances:
        coords, attrs = read_bag_coords(bag_path)
        ps = patch_size_level0 or bag_patch_size_level0(attrs, coords, bag_path)
        ext_x, ext_y = int(coords[:, 0].max() + ps), int(coords[:, 1].max() + ps)
        if ext_x > w0 or ext_y > h0:
            raise MilkitError(
                f"{bag_side}) has tiles up to ({ext_x}, {ext_y}) px, outside {slide_path.name} "
                f"({w0} × {h0} px)",
                path=slide_path,
                hint="Pass the slide the bag was made from",
            )
    problems: list[str] = []
    slide_id = slide_id_of(slide_path)
    # a DICOM series opened through one of its .dcm files is named after its folder when that
    # folder holds only this series (see slide_id_of)
    ids = {slide_id, slide_path.parent.name} if slide_path.suffix.lower() == ".dcm" else {slide_id}
    if bag_id is not None and bag_id not in ids:
        problems.append(f"slide id {bag_id!r} ≠ {slide_id!r}")
    sha = _recorded(root.get("slide_sha256"))
    size = _recorded(root.get("slide_size"))
    if slide_path.is_file() and (sha is not None or size is not None):
        st = slide_path.stat()
        actual = st.st_size
        limit = HASH_LIMIT_BYTES if hash_limit is None else hash_limit
        if size is not None and int(float(size)) != actual:
            problems.append(f"file size {int(float(size))} ≠ {actual} bytes")
        elif sha is not None and actual <= limit:
            digest = _sha256_of(str(slide_path.resolve()), actual, st.st_mtime_ns)
            if digest != sha:
                problems.append(f"sha256 {sha[:12]}… ≠ {digest[:12]}…")
    if not problems:
        return []
    text = "; ".join(problems)
    if allow_mismatch:
        return [f"{bag_path.name} was made from another file than {slide_path.name} ({text}); "
                "drawn anyway (--allow-slide-mismatch)"]  # fmt: skip
    raise MilkitError(
        f"{bag_side}) does not match slide {slide_path.name} ({text})",
        path=slide_path,
        hint="Pass the slide the bag was made from; for a renamed or re-saved copy of it use "
        "--allow-slide-mismatch",
    )


def heatmap_for_slide(
    slide_path: str | os.PathLike[str] | None,
    bag_path: str | os.PathLike[str],
    scores: Sequence[float] | np.ndarray,
    out_png: str | os.PathLike[str],
    *,
    thumbnail_size: int = 2048,
    patch_size_level0: float | None = None,
    allow_slide_mismatch: bool = False,
    notes: list[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Draw a bag's tile scores on its slide's thumbnail (see ``draw_heatmap`` for ``kwargs``).

    The slide is opened with ``feature_extraction.slides.Slide`` and checked against the bag
    first (:func:`check_slide_matches_bag`; ``allow_slide_mismatch`` lets a renamed/re-saved
    copy through, appending what differed to ``notes``). Without a slide (``slide_path=None``)
    the scores are drawn on a blank canvas with the slide's aspect ratio, taken from the bag's
    ``level0_width``/``level0_height`` attributes (or the tile extent).
    """
    bag_path = Path(bag_path)
    coords, attrs = read_bag_coords(bag_path)
    ps = (
        float(patch_size_level0)
        if patch_size_level0
        else bag_patch_size_level0(attrs, coords, bag_path)
    )
    if slide_path is not None:
        from milkit.feature_extraction.slides import Slide

        with Slide(slide_path) as slide:
            dims = tuple(int(v) for v in slide.dimensions)
            found = check_slide_matches_bag(
                bag_path,
                slide_path,
                dims,  # type: ignore[arg-type]
                allow_mismatch=allow_slide_mismatch,
                patch_size_level0=ps,
            )
            if notes is not None:
                notes.extend(found)
            else:  # allowed, but never silent
                for note in found:
                    warnings.warn(note, stacklevel=2)
            thumb = slide.thumbnail(thumbnail_size)
    else:
        if positive_attr(attrs.get("level0_width")) and positive_attr(attrs.get("level0_height")):
            dims = (int(attrs["level0_width"]), int(attrs["level0_height"]))
        elif len(coords):
            dims = (int(coords[:, 0].max() + ps), int(coords[:, 1].max() + ps))
        else:
            dims = (thumbnail_size, thumbnail_size)
        scale = min(1.0, thumbnail_size / max(dims))
        tw, th = max(1, math.ceil(dims[0] * scale)), max(1, math.ceil(dims[1] * scale))
        thumb = np.full((th, tw, 3), _BLANK_GREY, dtype=np.uint8)
    kwargs.setdefault("title", bag_path.stem)
    return draw_heatmap(thumb, coords, scores, ps, dims, out_png, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "NORMALIZE",
    "check_slide_matches_bag",
    "draw_heatmap",
    "font_px",
    "heatmap_figure",
    "heatmap_for_slide",
    "new_figure",
    "save_figure",
]
