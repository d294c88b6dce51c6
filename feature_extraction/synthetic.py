"""Synthetic whole-slide images with known tissue and tumour masks (demo, tests, benchmarks).

A slide is a pyramidal, JPEG-tiled TIFF with an Aperio-style ImageDescription, so OpenSlide opens
it as vendor ``aperio`` with the requested mpp. Pixels are never held as a whole image: a
low-resolution *layout* (tissue and tumour masks, one mask pixel = ``mask_downsample`` level-0
pixels) plus two small periodic textures (normal tissue, tumour) are enough to render any tile of
any pyramid level on demand, so a 100,000 × 80,000 slide streams tile by tile into tifffile.

Tumour regions look clearly different from normal tissue (denser, larger, darker, bluer nuclei on a
more purple background), so even a weight-free colour/texture encoder can separate them; the masks
are saved beside the slide (``<stem>.masks.npz``) as ground truth.

Marker ink (:class:`PenStroke`): pathologists' blue, green, black or red marker strokes drawn on
the glass or over tissue, rendered as a coloured filter over whatever lies beneath (with streaks),
and saved as a label mask (``ink_mask``) so tests can count the tiles that hold only ink.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from milkit.errors import MilkitError
from milkit.feature_extraction.coverage import box_coverage
from milkit.io.atomic import atomic_path

_TEXTURE_PX = 1024  # level-0 side of the periodic tissue textures (4 × 4 tiles of 256 px)
_BACKGROUND_BGR = (242, 242, 243)  # glass: near-white, no saturation
_MAX_MASK_PIXELS = 4_000_000  # layout resolution cap: keeps a 100k × 80k slide's masks ~2 Mpx

# Marker ink as seen on glass (RGB), i.e. the fraction of light each ink lets through is this
# colour over the glass colour. Values picked from scanned marker strokes (dark, saturated blue and
# green, near-neutral black, saturated red); ``ink_mask`` labels are 1 + the index in this table.
PEN_RGB: dict[str, tuple[int, int, int]] = {
    "blue": (45, 95, 185),
    "green": (40, 130, 90),
    "black": (40, 40, 48),
    "red": (200, 45, 60),
}
PEN_COLOURS = tuple(PEN_RGB)


@dataclass(frozen=True)
class PenStroke:
    """One marker stroke: a polyline in level-0 pixels drawn ``width_um`` micrometres wide."""

    colour: str
    points: tuple[tuple[float, float], ...]
    width_um: float = 200.0

    def __post_init__(self) -> None:
        if self.colour not in PEN_RGB:
            raise MilkitError(
                "unknown pen colour", value=self.colour, hint=f"Use one of: {', '.join(PEN_RGB)}"
            )
        if len(self.points) < 1 or self.width_um <= 0:
            raise MilkitError(
                "a pen stroke needs at least one point and a positive width",
                value=(self.points, self.width_um),
            )


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide on disk and its ground truth.

    ``tissue_mask`` and ``tumour_mask`` are (ceil(H / d), ceil(W / d)) bool arrays with
    d = ``mask_downsample``: mask pixel (r, c) covers level-0 pixels [c·d, (c+1)·d) × [r·d, (r+1)·d),
    and every level-0 pixel is rendered from exactly that mask pixel, so the masks line up with
    the image exactly.
    """

    path: Path
    width: int
    height: int
    mpp: float
    tissue_mask: np.ndarray
    tumour_mask: np.ndarray
    mask_downsample: int
    texture_seed: int = 0
    ink_mask: np.ndarray | None = None  # uint8 labels: 0 none, 1 + index in PEN_COLOURS

    @property
    def masks_path(self) -> Path:
        return masks_path_for(self.path)


def masks_path_for(slide_path: str | Path) -> Path:
    """Where the ground-truth masks of a synthetic slide live: ``<stem>.masks.npz`` beside it."""
    slide_path = Path(slide_path)
    return slide_path.with_name(slide_path.stem + ".masks.npz")


# --------------------------------------------------------------------------------------------
# layout: low-resolution tissue and tumour masks


def _mask_downsample(width: int, height: int) -> int:
    ds = 16
    while math.ceil(width / ds) * math.ceil(height / ds) > _MAX_MASK_PIXELS:
        ds *= 2
    return ds


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Smooth random field of ``shape`` (h, w) with about ``cells`` blobs along the longer side."""
    h, w = shape
    scale = max(h, w) / max(cells, 1.0)
    gh = max(2, round(h / scale) + 2)
    gw = max(2, round(w / scale) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _tissue_layout(
    rng: np.random.Generator, shape: tuple[int, int], tissue_fraction: float
) -> np.ndarray:
    h, w = shape
    field = _smooth_field(rng, shape, 5.0) + 0.35 * _smooth_field(rng, shape, 18.0)
    # Keep a margin of glass along the border, as on a real slide.
    wy = np.clip(np.minimum(np.arange(h) + 0.5, h - np.arange(h) - 0.5) / (0.08 * h + 1e-6), 0, 1)
    wx = np.clip(np.minimum(np.arange(w) + 0.5, w - np.arange(w) - 0.5) / (0.08 * w + 1e-6), 0, 1)
    field = field - 3.0 * (1.0 - np.outer(wy, wx).astype(np.float32))
    if tissue_fraction <= 0:
        return np.zeros(shape, dtype=bool)
    if tissue_fraction >= 1:
        return np.ones(shape, dtype=bool)
    threshold = np.quantile(field, 1.0 - tissue_fraction)
    return field > threshold


def _ink_layout(
    shape: tuple[int, int], ds: int, mpp: float, strokes: Sequence[PenStroke]
) -> np.ndarray | None:
    """uint8 label mask of the strokes on the layout grid (None without strokes)."""
    if not strokes:
        return None
    ink = np.zeros(shape, dtype=np.uint8)
    for stroke in strokes:
        pts = np.round((np.asarray(stroke.points, dtype=np.float64) + 0.5) / ds - 0.5)
        # OpenCV draws a LINE_8 polyline of thickness t ≥ 2 about t + 2 pixels wide
        thickness = max(1, round(stroke.width_um / (mpp * ds)) - 2)
        label = 1 + PEN_COLOURS.index(stroke.colour)
        poly = pts.astype(np.int32).reshape(-1, 1, 2)
        if len(poly) == 1:
            c = (int(poly[0, 0, 0]), int(poly[0, 0, 1]))
            cv2.circle(ink, c, max(1, thickness // 2), label, -1, cv2.LINE_8)
        else:
            cv2.polylines(ink, [poly], False, label, thickness, cv2.LINE_8)
    return ink


def _tumour_layout(
    rng: np.random.Generator, tissue: np.ndarray, regions: int, fraction: float
) -> np.ndarray:
    """Tumour = the ``fraction`` of tissue pixels closest to ``regions`` random seeds (+ noise)."""
    tumour = np.zeros_like(tissue)
    ys, xs = np.nonzero(tissue)
    k = round(fraction * len(ys))
    if regions <= 0 or k <= 0:
        return tumour
    pick = rng.choice(len(ys), size=min(regions, len(ys)), replace=False)
    seeds = np.full(tissue.shape, 255, dtype=np.uint8)
    seeds[ys[pick], xs[pick]] = 0
    dist = cv2.distanceTransform(seeds, cv2.DIST_L2, 5)
    radius = math.sqrt(k / (math.pi * len(pick)))
    score = -dist + 0.35 * radius * _smooth_field(rng, tissue.shape, 40.0)
    tissue_scores = score[ys, xs]
    top = np.argpartition(-tissue_scores, min(k, len(ys)) - 1)[:k]
    tumour[ys[top], xs[top]] = True
    return tumour


# --------------------------------------------------------------------------------------------
# textures: periodic level-0 images, area-downsampled per pyramid level


def _wrap_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    pad = int(3 * sigma) + 1
    padded = np.pad(img, ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2), mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigma)[pad:-pad, pad:-pad]


def _texture(rng: np.random.Generator, mpp: float, tumour: bool) -> np.ndarray:
    """A periodic (P, P, 3) uint8 BGR texture of H&E-like tissue at ``mpp`` µm/px."""
    p = _TEXTURE_PX
    if tumour:  # purple background, crowded large dark-blue nuclei
        base, nucleus = (190, 120, 175), (150, 45, 60)
        spacing_um, radius_um = 11.0, 4.5
    else:  # pink stroma, sparse small violet nuclei
        base, nucleus = (200, 165, 235), (170, 90, 140)
        spacing_um, radius_um = 24.0, 2.8
    fibres = _wrap_blur(rng.standard_normal((p, p)).astype(np.float32), max(1.0, 4.0 / mpp))
    fibres *= 18.0 / (fibres.std() + 1e-6)
    grain = rng.normal(0.0, 5.0, (p, p)).astype(np.float32)
    img = np.empty((p, p, 3), dtype=np.float32)
    img[:] = base
    img += (fibres + grain)[..., None]
    canvas = np.clip(img, 0, 255).astype(np.uint8)
    area_px = (p * mpp / spacing_um) ** 2
    n = max(1, int(area_px))
    centres = rng.uniform(0, p, size=(n, 2))
    radii = np.maximum(1, rng.normal(radius_um / mpp, 0.2 * radius_um / mpp, n)).round()
    colours = np.clip(np.asarray(nucleus)[None, :] + rng.normal(0, 12, (n, 1)), 0, 255)
    for (cx, cy), r, colour_arr in zip(centres.tolist(), radii.tolist(), colours.tolist()):
        colour = tuple(int(c) for c in colour_arr)
        # Draw the wrapped copies too so the texture tiles seamlessly.
        for ox in (-p, 0, p):
            for oy in (-p, 0, p):
                x, y = cx + ox, cy + oy
                if -r <= x < p + r and -r <= y < p + r:
                    cv2.circle(canvas, (int(x), int(y)), int(r), colour, -1, cv2.LINE_AA)
    return canvas


@functools.lru_cache(maxsize=8)
def _ink_streaks(texture_seed: int, mpp: float) -> np.ndarray:
    """Periodic (P, P) float32 factor in about [0.8, 1.2]: marker ink is never perfectly even."""
    rng = np.random.default_rng([texture_seed, 3])
    p = _TEXTURE_PX
    # streaks: long along x, ~10 µm across (anisotropic blur of noise, wrapped so it tiles)
    sx, sy = max(1.0, 60.0 / mpp), max(1.0, 5.0 / mpp)
    pad = int(3 * max(sx, sy)) + 1
    noise = np.pad(rng.standard_normal((p, p)).astype(np.float32), pad, mode="wrap")
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=sx, sigmaY=sy)[pad:-pad, pad:-pad]
    field *= 0.08 / (field.std() + 1e-6)
    out = np.clip(1.0 + field, 0.8, 1.2).astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _textures(texture_seed: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(normal, tumour) textures; cached so a cohort sharing a texture seed renders them once."""
    rng = np.random.default_rng([texture_seed, 2])
    normal, tumour = _texture(rng, mpp, False), _texture(rng, mpp, True)
    normal.flags.writeable = False
    tumour.flags.writeable = False
    return normal, tumour


def _level_texture(texture: np.ndarray, downsample: float) -> np.ndarray:
    side = max(1, round(texture.shape[0] / downsample))
    return cv2.resize(texture, (side, side), interpolation=cv2.INTER_AREA).reshape(side, side, 3)


# --------------------------------------------------------------------------------------------
# tile rendering and TIFF writing


def _register_jpeg_encoder() -> None:
    """Let tifffile write JPEG tiles without the optional ``imagecodecs`` package.

    tifffile looks the JPEG compressor up even when it is handed already-encoded tiles (we encode
    with OpenCV's libjpeg-turbo); registering an OpenCV encoder in its codec cache satisfies that
    look-up. Deliberate use of a private tifffile attribute; a no-op when imagecodecs provides one.
    """
    codecs = getattr(tifffile.TIFF.COMPRESSORS, "_codecs", None)
    if codecs is None or 7 in codecs:
        return
    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:
        codecs[7] = lambda data, level=80, **_: _encode_jpeg_rgb(data, level)


def _encode_jpeg_bgr(tile_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", tile_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
        raise RuntimeError("OpenCV failed to encode a JPEG tile")
    return buf.tobytes()


def _encode_jpeg_rgb(tile_rgb: np.ndarray, quality: int) -> bytes:
    return _encode_jpeg_bgr(np.ascontiguousarray(tile_rgb[..., ::-1]), quality)


def _periodic_crop(tex: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [x, x+w) × [y, y+h) of the infinite periodic tiling of ``tex``."""
    p = tex.shape[0]
    x0, y0 = x % p, y % p
    if x0 + w <= p and y0 + h <= p:  # the common case: a plain slice, no gather
        return tex[y0 : y0 + h, x0 : x0 + w]
    rr = (y + np.arange(h)) % p
    cc = (x + np.arange(w)) % p
    return np.take(np.take(tex, rr, axis=0), cc, axis=1)


def _gather(block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), len(cols)) nearest-neighbour sample of a small bool block."""
    return np.take(np.take(block.view(np.uint8), rows, axis=0), cols, axis=1)


class _Renderer:
    """Renders BGR tiles of any pyramid level from the layout and textures."""

    def __init__(
        self,
        tissue: np.ndarray,
        tumour: np.ndarray,
        mask_downsample: int,
        normal_tex: np.ndarray,
        tumour_tex: np.ndarray,
        ink: np.ndarray | None = None,
        streaks: np.ndarray | None = None,
    ) -> None:
        self.tissue = tissue
        self.tumour = tumour
        self.ds = mask_downsample
        self.normal_tex = normal_tex
        self.tumour_tex = tumour_tex
        self.ink = ink if ink is not None and ink.any() else None
        self.streaks = streaks
        self._level_tex: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self._level_streaks: dict[float, np.ndarray] = {}
        self._glass_tile: np.ndarray | None = None
        # BGR fraction of light each ink label lets through (label 0: no ink)
        glass = np.asarray(_BACKGROUND_BGR, dtype=np.float32)
        ink_bgr = np.asarray([PEN_RGB[c][::-1] for c in PEN_COLOURS], dtype=np.float32)
        self._ink_lut = np.vstack([np.ones((1, 3), np.float32), np.minimum(ink_bgr / glass, 1)])

    def textures(self, downsample: float) -> tuple[np.ndarray, np.ndarray]:
        if downsample not in self._level_tex:
            self._level_tex[downsample] = (
                _level_texture(self.normal_tex, downsample),
                _level_texture(self.tumour_tex, downsample),
            )
        return self._level_tex[downsample]

    def region(
        self, x: int, y: int, w: int, h: int, scale: tuple[float, float], nominal: float
    ) -> np.ndarray | None:
        """BGR pixels of level pixels [x, x+w) × [y, y+h); None when it is all glass."""
        mh, mw = self.tissue.shape
        rows = np.minimum(((y + np.arange(h) + 0.5) * scale[1] / self.ds).astype(np.int64), mh - 1)
        cols = np.minimum(((x + np.arange(w) + 0.5) * scale[0] / self.ds).astype(np.int64), mw - 1)
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        block = self.tissue[r0:r1, c0:c1]
        ink = None if self.ink is None else self.ink[r0:r1, c0:c1]
        if ink is not None and not ink.any():
            ink = None
        if not block.any():
            if ink is None:
                return None
            out = self._glass(h, w).copy()
        else:
            out = self._tissue(block, r0, r1, c0, c1, rows, cols, x, y, w, h, nominal)
        if ink is not None:
            self._draw_ink(out, ink, rows - r0, cols - c0, x, y, w, h, nominal)
        return out

    def _tissue(
        self,
        block: np.ndarray,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        rows: np.ndarray,
        cols: np.ndarray,
        x: int,
        y: int,
        w: int,
        h: int,
        nominal: float,
    ) -> np.ndarray:
        normal_tex, tumour_tex = self.textures(nominal)
        out = np.array(_periodic_crop(normal_tex, x, y, w, h), order="C")
        tumour_block = self.tumour[r0:r1, c0:c1]
        # Two 1-D gathers on uint8 then an OpenCV masked copy: ~20× faster than np.where with a
        # broadcast 3-channel mask (measured), which matters for 100k-px slides.
        if tumour_block.any():
            tumour = _gather(tumour_block, rows - r0, cols - c0)
            cv2.copyTo(np.array(_periodic_crop(tumour_tex, x, y, w, h), order="C"), tumour, out)
        if not block.all():
            glass = 1 - _gather(block, rows - r0, cols - c0)
            cv2.copyTo(self._glass(h, w), glass, out)
        return out

    def _draw_ink(
        self,
        out: np.ndarray,
        ink: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        x: int,
        y: int,
        w: int,
        h: int,
        nominal: float,
    ) -> None:
        """Filter ``out`` (BGR, in place) through the ink: colour × streaks over what lies below."""
        labels = np.take(np.take(ink, rows, axis=0), cols, axis=1)
        factor = self._ink_lut[labels]
        if self.streaks is not None:
            if nominal not in self._level_streaks:
                side = max(1, round(self.streaks.shape[0] / nominal))
                self._level_streaks[nominal] = cv2.resize(
                    self.streaks, (side, side), interpolation=cv2.INTER_AREA
                ).reshape(side, side)
            streak = _periodic_crop(self._level_streaks[nominal], x, y, w, h)
            factor *= np.where(labels > 0, streak, np.float32(1))[..., None]
        out[:] = np.clip(out * factor, 0, 255).astype(np.uint8)

    def _glass(self, h: int, w: int) -> np.ndarray:
        if self._glass_tile is None or self._glass_tile.shape[:2] != (h, w):
            self._glass_tile = np.empty((h, w, 3), dtype=np.uint8)
            self._glass_tile[:] = _BACKGROUND_BGR
        return self._glass_tile


def _level_downsamples(width: int, height: int, levels: int | None) -> list[int]:
    """Aperio-like pyramid: factor 4 per level, down to about 512 px on the longer side."""
    if levels is not None:
        if levels < 1:
            raise MilkitError("levels must be at least 1", value=levels)
        return [4**k for k in range(levels)]
    out = [1]
    while max(width, height) / (out[-1] * 4) >= 512:
        out.append(out[-1] * 4)
    return out


def _tiles(
    renderer: _Renderer,
    lw: int,
    lh: int,
    tile: int,
    scale: tuple[float, float],
    nominal: float,
    quality: int,
    blank: bytes,
) -> Iterator[bytes]:
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            bgr = renderer.region(tx, ty, tile, tile, scale, nominal)
            yield blank if bgr is None else _encode_jpeg_bgr(bgr, quality)


def _aperio_description(
    width: int, height: int, lw: int, lh: int, tile: int, quality: int, mpp: float, name: str
) -> str:
    head = "Aperio Image Library v12.0.15 (milkit synthetic)\r\n"
    if (lw, lh) == (width, height):
        mag = 10.0 / mpp  # 10 µm/px ⇔ 1x, the usual objective-power convention (0.5 µm/px ⇔ 20x)
        return (
            f"{head}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
            f"|AppMag = {mag:g}|MPP = {mpp:g}|Filename = {name}|milkit.synthetic = 1"
        )
    return f"{head}{width}x{height} -> {lw}x{lh} - |AppMag = {10.0 / mpp:g}|MPP = {mpp:g}"


def _save_masks(path: Path, slide: SyntheticSlide) -> None:
    with atomic_path(masks_path_for(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            tissue_mask=slide.tissue_mask,
            tumour_mask=slide.tumour_mask,
            mask_downsample=np.int64(slide.mask_downsample),
            width=np.int64(slide.width),
            height=np.int64(slide.height),
            mpp=np.float64(slide.mpp),
            texture_seed=np.int64(slide.texture_seed),
            slide_name=np.str_(path.name),
            **({} if slide.ink_mask is None else {"ink_mask": slide.ink_mask}),
        )


def load_synthetic_masks(path: str | Path) -> SyntheticSlide:
    """Load the ground truth saved beside a synthetic slide (path of the slide or of the npz)."""
    path = Path(path)
    npz = path if path.name.endswith(".masks.npz") else masks_path_for(path)
    if not npz.exists():
        raise MilkitError(
            "no synthetic ground-truth masks beside this slide",
            path=npz,
            hint="Only slides made by feature_extraction.synthetic have them",
        )
    with np.load(npz) as data:
        if npz is not path:
            slide_path = path
        elif "slide_name" in data:
            slide_path = npz.with_name(str(data["slide_name"]))
        else:
            slide_path = npz.with_name(npz.name[: -len(".masks.npz")])
        return SyntheticSlide(
            path=slide_path,
            width=int(data["width"]),
            height=int(data["height"]),
            mpp=float(data["mpp"]),
            tissue_mask=data["tissue_mask"].astype(bool),
            tumour_mask=data["tumour_mask"].astype(bool),
            mask_downsample=int(data["mask_downsample"]),
            texture_seed=int(data["texture_seed"]) if "texture_seed" in data else 0,
            ink_mask=data["ink_mask"].astype(np.uint8) if "ink_mask" in data else None,
        )


def _validate(width: int, height: int, mpp: float, tile_size: int, quality: int) -> None:
    if width < 1 or height < 1:
        raise MilkitError("slide size must be positive", value=(width, height))
    if not 0.05 <= mpp <= 20:
        raise MilkitError("mpp must be within 0.05–20 µm/px", value=mpp)
    if tile_size < 16 or tile_size % 16:
        raise MilkitError("tile_size must be a positive multiple of 16", value=tile_size)
    if not 1 <= quality <= 100:
        raise MilkitError("jpeg_quality must be within 1–100", value=quality)


def make_layout(
    width: int,
    height: int,
    *,
    seed: int = 0,
    tissue_fraction: float = 0.5,
    tumour_regions: int = 0,
    tumour_fraction: float | None = None,
    tissue_box: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The low-resolution (tissue, tumour, mask_downsample) layout of a synthetic slide.

    ``tumour_fraction`` is the fraction of the *tissue* area that is tumour; with only
    ``tumour_regions`` given it defaults to 0.1, and with only a fraction one region is planted.
    ``tissue_box`` = (x0, y0, x1, y1), fractions of the slide width/height: tissue outside it is
    cut away (after ``tissue_fraction`` was applied to the whole slide), leaving glass for e.g.
    pen strokes.
    """
    ds = _mask_downsample(width, height)
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    rng = np.random.default_rng([seed, 1])
    tissue = _tissue_layout(rng, shape, float(tissue_fraction))
    if tissue_box is not None:
        bx0, by0, bx1, by1 = tissue_box
        if not (0 <= bx0 < bx1 <= 1 and 0 <= by0 < by1 <= 1):
            raise MilkitError("tissue_box must be fractions x0 < x1, y0 < y1 within 0–1",
                              value=tissue_box)  # fmt: skip
        keep = np.zeros(shape, dtype=bool)
        keep[round(by0 * shape[0]) : round(by1 * shape[0]),
             round(bx0 * shape[1]) : round(bx1 * shape[1])] = True  # fmt: skip
        tissue &= keep
    if tumour_fraction is None:
        tumour_fraction = 0.1 if tumour_regions > 0 else 0.0
    if tumour_fraction < 0 or tumour_fraction > 1:
        raise MilkitError("tumour_fraction must be within 0–1", value=tumour_fraction)
    regions = tumour_regions if tumour_regions > 0 else (1 if tumour_fraction > 0 else 0)
    tumour = _tumour_layout(rng, tissue, regions, float(tumour_fraction))
    return tissue, tumour, ds


def make_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    tile_size: int = 256,
    seed: int = 0,
    tissue_fraction: float = 0.5,
    tumour_regions: int = 0,
    tumour_fraction: float | None = None,
    jpeg_quality: int = 80,
    levels: int | None = None,
    texture_seed: int | None = None,
    tissue_box: tuple[float, float, float, float] | None = None,
    pen_strokes: Sequence[PenStroke] = (),
) -> SyntheticSlide:
    """Write a pyramidal JPEG-tiled Aperio-style TIFF (``.svs``) tile by tile; return its truth.

    Memory stays bounded by the layout (≤ ~4 Mpx of mask), two 1024-px textures and one tile,
    whatever the slide size. ``levels`` is the number of pyramid levels (factor 4 apart);
    default: down to about 512 px. The file is written atomically; masks go to
    ``<stem>.masks.npz``. ``texture_seed`` (default: ``seed``) picks the tissue textures; slides
    sharing it render faster (textures are cached). ``tissue_box`` confines tissue (see
    :func:`make_layout`); ``pen_strokes`` draws marker ink (ground truth: ``ink_mask``).
    """
    path = Path(path)
    _validate(width, height, mpp, tile_size, jpeg_quality)
    tissue, tumour, ds = make_layout(
        width,
        height,
        seed=seed,
        tissue_fraction=tissue_fraction,
        tumour_regions=tumour_regions,
        tumour_fraction=tumour_fraction,
        tissue_box=tissue_box,
    )
    texture_seed = seed if texture_seed is None else texture_seed
    ink = _ink_layout(tissue.shape, ds, float(mpp), pen_strokes)
    renderer = _Renderer(
        tissue,
        tumour,
        ds,
        *_textures(texture_seed, float(mpp)),
        ink=ink,
        streaks=_ink_streaks(texture_seed, float(mpp)),
    )
    blank = _encode_jpeg_bgr(
        np.full((tile_size, tile_size, 3), _BACKGROUND_BGR, dtype=np.uint8), jpeg_quality
    )
    _register_jpeg_encoder()
    bigtiff = width * height * 3 > 2**31  # compressed size is far smaller; stay safe
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for d in _level_downsamples(width, height, levels):
            lw, lh = max(1, width // d), max(1, height // d)
            scale = (width / lw, height / lh)
            tw.write(
                _tiles(renderer, lw, lh, tile_size, scale, float(d), jpeg_quality, blank),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(2, 2),  # OpenCV writes 4:2:0 JFIF
                description=_aperio_description(
                    width, height, lw, lh, tile_size, jpeg_quality, mpp, path.name
                ),
                metadata=None,
                subfiletype=0 if d == 1 else 1,
            )
    slide = SyntheticSlide(path, width, height, float(mpp), tissue, tumour, ds, texture_seed, ink)
    _save_masks(path, slide)
    return slide


def render_region(slide: SyntheticSlide, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 RGB pixels the writer produced for a region (before JPEG loss); for tests."""
    renderer = _Renderer(
        slide.tissue_mask,
        slide.tumour_mask,
        slide.mask_downsample,
        *_textures(slide.texture_seed, slide.mpp),
        ink=slide.ink_mask,
        streaks=_ink_streaks(slide.texture_seed, slide.mpp),
    )
    bgr = renderer.region(x, y, w, h, (1.0, 1.0), 1.0)
    if bgr is None:
        bgr = np.empty((h, w, 3), dtype=np.uint8)
        bgr[:] = _BACKGROUND_BGR
    return np.ascontiguousarray(bgr[..., ::-1])


def make_plain_tiff(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    seed: int = 0,
    tissue_fraction: float = 0.5,
    compression: str | None = "zlib",
) -> SyntheticSlide:
    """A small plain (strip, non-tiled) RGB TIFF that OpenSlide rejects; tests the tifffile path.

    The resolution tags carry ``mpp`` (pixels per centimetre) unless ``mpp`` is None.
    """
    path = Path(path)
    if width * height > 2**26:
        raise MilkitError("plain TIFFs are held in memory; keep them small", value=(width, height))
    tissue, tumour, ds = make_layout(width, height, seed=seed, tissue_fraction=tissue_fraction)
    # Without resolution tags the pixels are still drawn at 0.5 µm/px scale.
    slide = SyntheticSlide(path, width, height, float(mpp or 0.5), tissue, tumour, ds, seed)
    rgb = render_region(slide, 0, 0, width, height)
    kwargs: dict = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp, rgb, photometric="rgb", compression=compression, metadata=None, **kwargs
        )
    _save_masks(path, slide)
    return slide


def tumour_fraction_of_tiles(
    masks: SyntheticSlide, coords: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Exact fraction (float32, N) of each level-0 tile covered by the tumour mask."""
    ds = float(masks.mask_downsample)
    return box_coverage(masks.tumour_mask, (ds, ds), coords, patch_size_level0)


def tissue_fraction_of_tiles(
    masks: SyntheticSlide, coords: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Exact fraction (float32, N) of each level-0 tile covered by the tissue mask."""
    ds = float(masks.mask_downsample)
    return box_coverage(masks.tissue_mask, (ds, ds), coords, patch_size_level0)


def ink_fraction_of_tiles(
    masks: SyntheticSlide, coords: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Exact fraction (float32, N) of each level-0 tile covered by marker ink (0 without ink)."""
    if masks.ink_mask is None:
        return np.zeros(len(np.asarray(coords).reshape(-1, 2)), dtype=np.float32)
    ds = float(masks.mask_downsample)
    return box_coverage(masks.ink_mask > 0, (ds, ds), coords, patch_size_level0)


# The marker-ink test case of issue 10: a 2 × 2 mm slide (4000² px at 0.5 µm/px), tissue in the
# left 55 %, and blue, green and black strokes 0.20–0.25 mm wide on the glass beside it.
INK_CASE_STROKES = (
    PenStroke("blue", ((2700.0, 600.0), (2850.0, 900.0), (2880.0, 1250.0)), 250.0),
    PenStroke("green", ((3300.0, 2000.0), (3420.0, 2400.0)), 200.0),
    PenStroke("black", ((2800.0, 3050.0), (3150.0, 3280.0)), 220.0),
)


def make_ink_case(path: str | Path, *, ink: bool = True, seed: int = 5) -> SyntheticSlide:
    """The marker-ink test slide (``ink=False``: the same slide, pixel for pixel, without ink)."""
    return make_synthetic_slide(
        path,
        4000,
        4000,
        mpp=0.5,
        seed=seed,
        tissue_fraction=0.55,
        tissue_box=(0.0, 0.0, 0.55, 1.0),
        pen_strokes=INK_CASE_STROKES if ink else (),
    )


def make_synthetic_cohort(
    out_dir: str | Path,
    n_slides: int,
    *,
    size: tuple[int, int] = (4096, 4096),
    positive_fraction: float = 0.5,
    tumour_fraction: float = 0.03,
    seed: int = 0,
    mpp: float = 0.5,
    tumour_regions: int = 2,
) -> "pd.DataFrame":  # noqa: F821, UP037 - pandas imported lazily
    """Write ``n_slides`` synthetic slides and ``labels.csv`` (slide_id, label, case_id, slide_path).

    Labels are "tumour" (planted tumour regions covering ``tumour_fraction`` of the tissue) or
    "normal"; exactly round(n · positive_fraction) slides are positive, in shuffled order.
    Each slide is its own case (``case_<i>``).
    """
    import pandas as pd

    from milkit.io.atomic import atomic_write_text

    if n_slides < 1:
        raise MilkitError("n_slides must be at least 1", value=n_slides)
    if not 0 <= positive_fraction <= 1:
        raise MilkitError("positive_fraction must be within 0–1", value=positive_fraction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = round(n_slides * positive_fraction)
    positive = np.zeros(n_slides, dtype=bool)
    positive[:n_pos] = True
    rng.shuffle(positive)
    rows = []
    for i in range(n_slides):
        slide_id = f"synth_{i:03d}"
        path = out_dir / f"{slide_id}.svs"
        make_synthetic_slide(
            path,
            size[0],
            size[1],
            mpp=mpp,
            seed=seed * 100_003 + i,
            texture_seed=seed,
            tissue_fraction=float(rng.uniform(0.3, 0.55)),
            tumour_regions=tumour_regions if positive[i] else 0,
            tumour_fraction=tumour_fraction if positive[i] else 0.0,
        )
        rows.append(
            {
                "slide_id": slide_id,
                "label": "tumour" if positive[i] else "normal",
                "case_id": f"case_{i:03d}",
                "slide_path": str(path.resolve()),
            }
        )
    table = pd.DataFrame(rows, columns=["slide_id", "label", "case_id", "slide_path"])
    atomic_write_text(out_dir / "labels.csv", table.to_csv(index=False))
    return table
