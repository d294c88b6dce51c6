"""Tissue segmentation on a low-resolution view of the slide (≈ 8 µm/px).

Pipeline (CLAM's classic recipe, ``wsi_core/WholeSlideImage.py::segmentTissue``, re-derived with
physical units): HSV saturation → median blur → Otsu or fixed threshold → morphological closing →
drop small objects and fill small holes with OpenCV connected components.

Departures from CLAM, on purpose:
- Kernel sizes and area limits are in micrometres, converted with the mask's actual µm/px, so a
  tiny slide (CMU-1-Small-Region, 1.1 × 1.5 mm) and a 100k-px resection are treated alike; CLAM's
  default area filter (100 × 512² level-0 px) removes all tissue of such a tiny slide.
- The view is always resampled to about ``seg_mpp`` (via :meth:`Slide.thumbnail`, which reads the
  best pyramid level and area-averages it block by block), so single-level slides never need a
  whole-level read; CLAM reads the whole level and aborts above 1e8 px.
- Otsu gets a floor (``otsu_floor``) so an all-glass slide yields an empty mask instead of
  thresholded noise, and near-black pixels (scanner borders) are never tissue.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from milkit.errors import MilkitError


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
    """

    seg_mpp: float = 8.0
    saturation_threshold: int | str = "otsu"
    otsu_floor: int = 15
    black_value: int = 25
    median_um: float = 40.0
    closing_um: float = 32.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0

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
        for name in ("median_um", "closing_um", "min_object_um2", "max_hole_um2"):
            if getattr(self, name) < 0:
                raise MilkitError(f"{name} must not be negative", value=getattr(self, name))
        if not 0 <= self.otsu_floor <= 255 or not 0 <= self.black_value <= 255:
            raise MilkitError(
                "otsu_floor and black_value must be within 0–255",
                value=(self.otsu_floor, self.black_value),
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        return cls.from_dict(json.loads(text))


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
    ``(dx, dy) = downsample``.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    params: TissueParams
    threshold: float = float("nan")
    mpp: float = float("nan")  # µm per mask pixel (x)
    info: dict[str, Any] = field(default_factory=dict)

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


def _odd_kernel(um: float, mpp: float) -> int:
    """Odd kernel width in mask pixels for a physical width (0 or 1 → no-op)."""
    k = round(um / mpp)
    if k <= 1:
        return 1
    return k if k % 2 else k + 1


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # background label
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    if max_px <= 0 or mask.all():
        return mask
    background = (~mask).view(np.uint8)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_px) & ~touches_border
    fill[0] = False  # label 0 is the tissue itself here
    return mask | fill[labels]


def segment_rgb(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, float]:
    """Segment an RGB overview at ``mpp`` µm/px; returns (bool mask, threshold used)."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool), float("nan")
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    sat = np.ascontiguousarray(hsv[..., 1])
    k = _odd_kernel(params.median_um, mpp)
    if k > 1:
        k = min(k, 255)  # OpenCV's uint8 median supports any odd size; cap for sanity
        sat = cv2.medianBlur(sat, k)
    if params.saturation_threshold == "otsu":
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(float(otsu), float(params.otsu_floor))
    else:
        threshold = float(params.saturation_threshold)
    mask = (sat > threshold) & (hsv[..., 2] >= params.black_value)
    k = _odd_kernel(params.closing_um, mpp)
    if k > 1 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_area = mpp * mpp
    mask = _remove_small_objects(mask, params.min_object_um2 / px_area)
    mask = _fill_small_holes(mask, params.max_hole_um2 / px_area)
    return mask, threshold


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
    mask, threshold = segment_rgb(rgb, mask_mpp, params)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        params=params,
        threshold=threshold,
        mpp=mask_mpp,
        info={"view_size": (mw, mh)},
    )
