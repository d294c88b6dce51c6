"""Tissue segmentation on a low-resolution view of the slide (≈ 8 µm/px).

Pipeline (CLAM's classic recipe, ``wsi_core/WholeSlideImage.py::segmentTissue``, re-derived with
physical units): HSV saturation → median blur → Otsu or fixed threshold → morphological closing →
drop small objects and fill small holes (OpenCV contours, areas by Pick's theorem).

Departures from CLAM, on purpose:
- Kernel sizes and area limits are in micrometres, converted with the mask's actual µm/px, so a
  tiny slide (CMU-1-Small-Region, 1.1 × 1.5 mm) and a 100k-px resection are treated alike; CLAM's
  default area filter (100 × 512² level-0 px) removes all tissue of such a tiny slide.
- The view is always resampled to about ``seg_mpp`` (via :meth:`Slide.thumbnail`, which reads the
  best pyramid level and area-averages it block by block), so single-level slides never need a
  whole-level read; CLAM reads the whole level and aborts above 1e8 px.
- Otsu gets a floor (``otsu_floor``) so an all-glass slide yields an empty mask instead of
  thresholded noise, and near-black pixels (scanner borders) are never tissue.
- Marker (pen) ink is removed before anything else (on by default, ``pen_ink``): saturated,
  dark ink passes any saturation threshold, so CLAM and TRIDENT's Otsu tile it as tissue. See
  :func:`find_pen_ink`; the removed regions are kept in :attr:`TissueMask.ink` for QC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from milkit.errors import MilkitError

# Hue ranges of marker inks on the 0–360° wheel (OpenCV stores hue/2 in uint8). H&E never falls
# in 70–236°: eosin is pink-red (300–360°), haematoxylin blue-violet (≥ 240°, red exceeds green),
# so blue ink (190–236°, green exceeds red) and green ink (70–190°) are told apart by hue alone.
# Red ink shares eosin's and blood's hues; only very saturated red counts, and it is opt-in.
PEN_INKS = ("blue", "green", "black", "red")
_HUE_DEG = {"blue": (190, 236), "green": (70, 189)}
_RED_HUE_DEG = (340, 10)  # wraps around 0°
_RED_MIN_SATURATION = 150  # 0–255; eosin and most blood stay below at ≈ 8 µm/px
_BLACK_STREAK_HEADROOM = 24  # 0–255 value units a black stroke's lighter streaks may rise above
_GLASS_VALUE = 200  # 0–255: brighter pixels are (near) glass, left out of the texture measure


@dataclass(frozen=True)
class TissueParams:
    """Segmentation parameters (physical units; saved as JSON in every bag).

    Attributes:
        seg_mpp: µm/px of the segmentation view (≈ 8, i.e. 1.25x).
        saturation_threshold: 0–255 HSV saturation cut, or "otsu".
        otsu_floor: lowest threshold Otsu may pick (glass-only slides stay empty).
        black_value: pixels darker than this HSV value are never tissue (scan borders, pen).
        median_um: median-blur kernel width in µm.
        closing_um: closing kernel width in µm (bridges small gaps inside tissue).
        min_object_um2: tissue pieces smaller than this area are dropped.
        max_hole_um2: holes smaller than this area are filled (larger ones stay background).
        pen_ink: marker inks removed before segmentation, any of ``blue``, ``green``, ``black``,
            ``red`` (empty: no pen filter). Red is off by default (blood and eosin look alike).
        pen_min_saturation: 0–255 HSV saturation a pixel needs to count as blue/green ink.
        black_ink_value: 0–255 HSV value at or below which a textureless pixel is black ink.
        black_ink_max_saturation: black ink is near-neutral; darker-than-this-value pixels more
            saturated than this (0–255) are dense haematoxylin, not ink.
        black_ink_std: black ink's local standard deviation of HSV value (0–255 units) stays
            below this over a ``pen_texture_um`` window; dark tissue is more textured.
        pen_texture_um: window width (µm) for that texture measure.
        pen_min_um2: ink regions smaller than this are left alone (dye specks, stain debris).
        pen_margin_um: removed ink is grown by this much (stroke edges blend into glass).
    """

    seg_mpp: float = 8.0
    saturation_threshold: int | str = "otsu"
    otsu_floor: int = 15
    black_value: int = 25
    median_um: float = 40.0
    closing_um: float = 32.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0
    pen_ink: tuple[str, ...] = ("blue", "green", "black")
    pen_min_saturation: int = 70
    black_ink_value: int = 90
    black_ink_max_saturation: int = 120
    black_ink_std: float = 8.0
    pen_texture_um: float = 64.0
    pen_min_um2: float = 20_000.0
    pen_margin_um: float = 16.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.seg_mpp <= 200:
            raise MilkitError("seg_mpp must be within 0.1–200 µm/px", value=self.seg_mpp)
        thr = self.saturation_threshold
        if isinstance(thr, str):
            if thr != "otsu":
                raise MilkitError(
                    "saturation_threshold must be an integer 0–255 or 'otsu'", value=thr
                )
        elif isinstance(thr, bool) or not isinstance(thr, (int, np.integer)) or not 0 <= thr <= 255:
            raise MilkitError("saturation_threshold must be an integer 0–255 or 'otsu'", value=thr)
        inks = [self.pen_ink] if isinstance(self.pen_ink, str) else list(self.pen_ink)
        unknown = sorted({str(c) for c in inks} - set(PEN_INKS))
        if unknown:
            raise MilkitError(
                "unknown pen ink colour(s)",
                value=unknown,
                hint=f"Use any of: {', '.join(PEN_INKS)}",
            )
        # canonical order, no duplicates: equal settings give equal JSON (resume compares it)
        object.__setattr__(self, "pen_ink", tuple(c for c in PEN_INKS if c in inks))
        for name in ("pen_min_saturation", "black_ink_value", "black_ink_max_saturation"):
            if not 0 <= getattr(self, name) <= 255:
                raise MilkitError(f"{name} must be within 0–255", value=getattr(self, name))
        for name in (
            "median_um",
            "closing_um",
            "min_object_um2",
            "max_hole_um2",
            "black_ink_std",
            "pen_texture_um",
            "pen_min_um2",
            "pen_margin_um",
        ):
            if getattr(self, name) < 0:
                raise MilkitError(f"{name} must not be negative", value=getattr(self, name))
        if not 0 <= self.otsu_floor <= 255 or not 0 <= self.black_value <= 255:
            raise MilkitError(
                "otsu_floor and black_value must be within 0–255",
                value=(self.otsu_floor, self.black_value),
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pen_ink"] = list(self.pen_ink)
        return out

    def to_json(self) -> str:
        """Stable JSON (sorted keys) for bag attributes and manifests."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TissueParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MilkitError(
                "unknown tissue-segmentation parameter(s)",
                value=unknown,
                hint=f"Accepted: {', '.join(sorted(known))}",
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TissueParams:
        """Parameters recorded in a bag. Records written before the pen filter existed have no
        ``pen_ink`` key; that slide was segmented without it, so the result says so (empty)."""
        data = json.loads(text)
        data.setdefault("pen_ink", [])
        return cls.from_dict(data)


PRESETS: dict[str, TissueParams] = {
    # Sensible for most H&E: Otsu on saturation, fragments ≥ 0.02 mm² kept.
    "default": TissueParams(),
    # Needle/small biopsies: keep small fragments, fill fewer holes.
    "biopsy": TissueParams(min_object_um2=4_000.0, max_hole_um2=8_000.0, closing_um=24.0),
    # Large resections: drop debris, fill bigger holes (fat, vessels inside the tissue).
    "resection": TissueParams(min_object_um2=100_000.0, max_hole_um2=100_000.0, closing_um=48.0),
    # Faint stains / frozen sections: low fixed threshold, keep almost everything.
    "permissive": TissueParams(
        saturation_threshold=8, median_um=24.0, min_object_um2=1_000.0, max_hole_um2=50_000.0
    ),
}


def parse_pen_ink(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"blue,green"`` / ``["green", "blue"]`` → ``("blue", "green")``; ``"none"`` or ``""`` → ().

    Raises MilkitError naming the accepted colours for anything else.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names in (["none"], ["off"]):
        return ()
    unknown = sorted(set(names) - set(PEN_INKS))
    if unknown:
        raise MilkitError(
            "unknown pen ink colour(s)",
            value=unknown,
            hint=f"Use a comma-separated list of {', '.join(PEN_INKS)}, or 'none'",
        )
    return tuple(c for c in PEN_INKS if c in names)


def get_preset(name: str) -> TissueParams:
    """A copy of preset ``name``; MilkitError listing the presets otherwise."""
    if name not in PRESETS:
        raise MilkitError(
            "unknown tissue-segmentation preset",
            value=name,
            hint=f"Choose one of: {', '.join(PRESETS)}",
        )
    return PRESETS[name]


@dataclass(frozen=True)
class TissueMask:
    """Binary tissue mask of a slide.

    ``mask[r, c]`` covers level-0 pixels ``[c·dx, (c+1)·dx) × [r·dy, (r+1)·dy)`` with
    ``(dx, dy) = downsample``. ``ink`` (same grid, or None when the pen filter found nothing or
    was off) marks the marker ink removed from the tissue.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    params: TissueParams
    threshold: float = float("nan")
    mpp: float = float("nan")  # µm per mask pixel (x)
    info: dict[str, Any] = field(default_factory=dict)
    ink: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp**2) / 1e6

    @property
    def ink_area_mm2(self) -> float:
        """Area removed as marker ink (0.0 when none was found or the filter was off)."""
        if self.ink is None or not np.isfinite(self.mpp):
            return 0.0
        return float(np.count_nonzero(self.ink)) * (self.mpp**2) / 1e6


def _odd_kernel(um: float, mpp: float) -> int:
    """Odd kernel width in mask pixels for a physical width (0 or 1 → no-op)."""
    k = round(um / mpp)
    if k <= 1:
        return 1
    return k if k % 2 else k + 1


def _pixel_counts(contours: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels enclosed including the boundary, pixels strictly inside) for pixel-centre contours.

    Pick's theorem on the lattice polygon through the boundary pixel centres (CHAIN_APPROX_NONE
    lists every boundary pixel, B of them): inside = A − B/2 + 1, inside + boundary = A + B/2 + 1.
    """
    area = np.array([cv2.contourArea(c) for c in contours], dtype=np.float64)
    boundary = np.array([len(c) for c in contours], dtype=np.float64)
    return area + boundary / 2 + 1, np.maximum(area - boundary / 2 + 1, 0)


def clean_mask(mask: np.ndarray, min_object_px: float, max_hole_px: float) -> np.ndarray:
    """Drop tissue pieces under ``min_object_px`` (net of holes); fill holes under ``max_hole_px``.

    Works on contours (OpenCV ``RETR_CCOMP``: outer boundaries and their holes), whose cost
    follows the boundary length, not the mask area: ~20× faster than connected-component
    labelling of a 10-Mpx mask (measured). Holes are background regions enclosed by tissue;
    glass connected to the slide border is never a hole.
    """
    if not mask.any() or (min_object_px <= 1 and max_hole_px <= 0):
        return mask
    u8 = np.ascontiguousarray(mask).view(np.uint8).copy()
    contours, hierarchy = cv2.findContours(u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return mask
    parents = hierarchy[0][:, 3]
    with_boundary, inside = _pixel_counts(list(contours))
    outer = np.flatnonzero(parents < 0)
    holes = np.flatnonzero(parents >= 0)
    hole_px = np.zeros(len(contours))
    np.add.at(hole_px, parents[holes], inside[holes])
    out = u8
    drop = [contours[i] for i in outer if with_boundary[i] - hole_px[i] < min_object_px]
    if drop:
        cv2.drawContours(out, drop, -1, 0, thickness=cv2.FILLED)
    dropped = {int(i) for i in outer if with_boundary[i] - hole_px[i] < min_object_px}
    fill = [
        contours[i] for i in holes if inside[i] < max_hole_px and int(parents[i]) not in dropped
    ]
    if fill:
        cv2.drawContours(out, fill, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def _hue_range(hsv: np.ndarray, lo_deg: float, hi_deg: float, min_sat: int) -> np.ndarray:
    """uint8 0/255 mask of pixels with hue in [lo, hi] degrees and saturation ≥ ``min_sat``."""
    lo, hi = math.ceil(lo_deg / 2), math.floor(hi_deg / 2)  # OpenCV: hue/2 in 0–179
    return cv2.inRange(hsv, (lo, int(min_sat), 0), (hi, 255, 255))


def _textureless(
    value: np.ndarray,
    candidates: np.ndarray,
    max_value: int,
    k: int,
    max_std: float,
    min_value: int = 0,
) -> np.ndarray:
    """uint8 0/255: connected regions of ``candidates`` that are mostly (≥ half) textureless,
    mostly at or below ``max_value`` and not mostly below ``min_value`` (pitch-black scanner
    borders).

    A candidate pixel is textureless when the std of ``value`` over the non-glass pixels
    (value < :data:`_GLASS_VALUE`) of the k × k box around it is ≤ ``max_std``: glass beside a
    stroke does not count, so a stroke thinner than the box is judged by its own pixels, while
    tissue is judged by all of its pixels (not only its darkest, whose spread is truncated).
    Judging whole regions keeps a stroke's rims and lighter streaks (candidates a little above
    ``max_value``) with it. Computed only inside the bounding box of the candidates (plus the
    window).
    """
    out = np.zeros_like(candidates)
    x, y, w, h = cv2.boundingRect(candidates)
    if w == 0 or h == 0:
        return out
    half = k // 2
    x0, y0 = max(0, x - half), max(0, y - half)
    x1, y1 = min(value.shape[1], x + w + half), min(value.shape[0], y + h + half)
    region = candidates[y0:y1, x0:x1]
    m = (value[y0:y1, x0:x1] < _GLASS_VALUE).astype(np.float32)
    v = value[y0:y1, x0:x1].astype(np.float32) * m
    box = {"ksize": (k, k), "borderType": cv2.BORDER_CONSTANT}
    count = np.maximum(cv2.blur(m, **box), 1e-6)
    mean = cv2.blur(v, **box) / count
    var = cv2.blur(v * v, **box) / count - mean * mean
    smooth_px = var <= max_std * max_std
    n, labels = cv2.connectedComponents(region, connectivity=8)
    smooth = np.bincount(labels[smooth_px], minlength=n)
    dark = np.bincount(labels[value[y0:y1, x0:x1] <= max_value], minlength=n)
    pitch = np.bincount(labels[value[y0:y1, x0:x1] < min_value], minlength=n)
    total = np.bincount(labels.ravel(), minlength=n)
    keep = (2 * smooth >= total) & (2 * dark >= total) & (2 * pitch < total)
    keep[0] = False
    out[y0:y1, x0:x1] = keep[labels].view(np.uint8) * np.uint8(255)
    return out


def find_pen_ink(hsv: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray | None:
    """Marker ink in an HSV overview (OpenCV uint8 HSV) at ``mpp`` µm/px; None when there is none.

    Rules (our own; the idea of colour rules for pens follows deephistopath/histolab's RGB pen
    filters and HistoQC's pen-marking module, but thresholds here are hue/saturation/value and
    sizes physical):

    - blue ink: hue 190–236°, green ink: hue 70–189°, both with saturation ≥
      ``pen_min_saturation``; no H&E stain has these hues (see ``_HUE_DEG``).
    - black ink: value ≤ ``black_ink_value``, near-neutral (saturation ≤
      ``black_ink_max_saturation``; dark haematoxylin is saturated purple) and textureless (local
      std of value ≤ ``black_ink_std`` over ``pen_texture_um``; dark tissue is textured).
    - red ink (opt-in): hue within 340–10° with saturation ≥ 150.

    Regions smaller than ``pen_min_um2`` are ignored (isolated specks, tissue-marking dye on a
    margin), small gaps inside strokes are filled, and the result is grown by ``pen_margin_um``.
    Returns a bool (h, w) mask.
    """
    if not params.pen_ink or hsv.size == 0:
        return None
    px_area = mpp * mpp
    min_px = max(1.0, params.pen_min_um2 / px_area)
    ink = np.zeros(hsv.shape[:2], dtype=np.uint8)
    hues = [_HUE_DEG[c] for c in params.pen_ink if c in _HUE_DEG]
    if len(hues) == 2:  # blue and green ranges touch: one pass over the image
        hues = [(min(lo for lo, _ in hues), max(hi for _, hi in hues))]
    for lo, hi in hues:
        cv2.bitwise_or(ink, _hue_range(hsv, lo, hi, params.pen_min_saturation), dst=ink)
    if "red" in params.pen_ink:
        lo, hi = _RED_HUE_DEG
        cv2.bitwise_or(ink, _hue_range(hsv, lo, 360, _RED_MIN_SATURATION), dst=ink)
        cv2.bitwise_or(ink, _hue_range(hsv, 0, hi, _RED_MIN_SATURATION), dst=ink)
    if "black" in params.pen_ink:
        # candidates: near-neutral and dark, with headroom for the lighter streaks of a stroke
        # (_BLACK_STREAK_HEADROOM); a region must still be mostly at or below black_ink_value,
        # and not mostly below black_value / 2 (pitch-black scanner borders, never tissue anyway)
        top = min(255, int(params.black_ink_value) + _BLACK_STREAK_HEADROOM)
        dark = cv2.inRange(hsv, (0, 0, 0), (180, int(params.black_ink_max_saturation), top))
        # fewer dark pixels than one ink region needs: no black ink (skips the texture pass)
        if cv2.countNonZero(dark) >= min_px:
            k = max(3, _odd_kernel(params.pen_texture_um, mpp))
            value = np.ascontiguousarray(hsv[..., 2])
            black = _textureless(
                value,
                dark,
                params.black_ink_value,
                k,
                params.black_ink_std,
                min_value=params.black_value // 2,
            )
            cv2.bitwise_or(ink, black, dst=ink)
    if cv2.countNonZero(ink) < min_px:
        return None
    found = clean_mask(ink > 0, min_px, min_px)
    if not found.any():
        return None
    r = round(params.pen_margin_um / mpp)
    if r >= 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        found = cv2.dilate(found.view(np.uint8), kernel).view(bool)
    return found


def segment_rgb(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, float]:
    """Segment an RGB overview at ``mpp`` µm/px; returns (bool mask, threshold used)."""
    mask, threshold, _ = segment_rgb_with_ink(rgb, mpp, params)
    return mask, threshold


def segment_rgb_with_ink(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """:func:`segment_rgb` plus the marker-ink mask removed from it (None: no ink / filter off)."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool), float("nan"), None
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    ink = find_pen_ink(hsv, mpp, params)
    sat = np.ascontiguousarray(hsv[..., 1])
    k = _odd_kernel(params.median_um, mpp)
    if k > 1:
        k = min(k, 255)  # OpenCV's uint8 median supports any odd size; cap for sanity
        sat = cv2.medianBlur(sat, k)
    if params.saturation_threshold == "otsu":
        # Ink is the most saturated thing on a slide: left in, it drags Otsu's cut up between
        # ink and tissue instead of between tissue and glass.
        values = sat if ink is None else sat[~ink].reshape(-1, 1)
        if values.size:
            otsu, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            otsu = 255.0
        threshold = max(float(otsu), float(params.otsu_floor))
    else:
        threshold = float(params.saturation_threshold)
    mask = (sat > threshold) & (hsv[..., 2] >= params.black_value)
    if ink is not None:
        mask &= ~ink
    k = _odd_kernel(params.closing_um, mpp)
    if k > 1 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_area = mpp * mpp
    mask = clean_mask(mask, params.min_object_um2 / px_area, params.max_hole_um2 / px_area)
    if ink is not None:  # closing and hole filling must not put ink back
        mask = mask & ~ink
    return mask, threshold, ink


def segment_tissue(slide: Any, params: TissueParams = TissueParams()) -> TissueMask:
    """Segment ``slide`` (a :class:`feature_extraction.slides.Slide`) at about ``params.seg_mpp``.

    The overview comes from :meth:`Slide.thumbnail`, which reads the pyramid level closest to
    (not coarser than) the target and area-averages it, block by block for huge levels. If the
    slide is already coarser than ``seg_mpp`` the level-0 image is used as is.
    """
    w0, h0 = slide.dimensions
    slide_mpp = float(slide.mpp)
    target_ds = max(1.0, params.seg_mpp / slide_mpp)
    max_side = max(1, math.ceil(max(w0, h0) / target_ds))
    rgb = slide.thumbnail(max_side)
    mh, mw = rgb.shape[:2]
    downsample = (w0 / mw, h0 / mh)
    mask_mpp = slide_mpp * (downsample[0] + downsample[1]) / 2
    mask, threshold, ink = segment_rgb_with_ink(rgb, mask_mpp, params)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        params=params,
        threshold=threshold,
        mpp=mask_mpp,
        info={"view_size": (mw, mh)},
        ink=ink,
    )
