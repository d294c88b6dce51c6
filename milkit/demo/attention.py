"""Where a trained model looks: out-of-fold attention and its overlap with planted tumour.

Models without attention are scored by their instance (tile) predictions instead.

For every fold of a cross-validation run the fold's selected checkpoint (``best.pt``) scores the
slides of *its own test fold*, so each slide's attention comes from a model that never saw it.
On synthetic slides the planted tumour mask is known, so the attention can be checked against
it: a model that learned "tumour" puts its top-decile attention on tumour tiles far more often
than chance (the tumour share of the slide's tiles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_path
from milkit.io.runs import BEST_CHECKPOINT, fold_dir

# A tile counts as tumour when planted tumour covers at least this share of its area; low
# enough that tiles on a small region's border count, high enough to ignore a clipped corner.
TUMOUR_TILE_MIN_COVERAGE = 0.1
TOP_FRACTION = 0.1  # "top decile" of attention
LOG_FLOOR = -8.0  # heatmap colour range: attention 1e-8 (blue) ... 1 (red), log scale


@dataclass
class TumourLocalisation:
    """Attention of one slide measured against its planted tumour tiles.

    ``top_hit_rate``: share of the top-decile attention tiles that are tumour tiles;
    ``chance``: share of all tiles that are tumour tiles (the hit rate of random attention);
    ``attention_mass``: summed (normalised) attention on tumour tiles.
    """

    slide_id: str
    n_tiles: int
    n_tumour_tiles: int
    top_k: int
    top_hit_rate: float
    chance: float
    attention_mass: float

    @property
    def best_possible(self) -> float:
        """The hit rate of attention that ranks every tumour tile first."""
        return min(1.0, self.n_tumour_tiles / self.top_k) if self.top_k else math.nan

    @property
    def enrichment(self) -> float:
        return self.top_hit_rate / self.chance if self.chance > 0 else math.nan


def tumour_localisation(
    slide_id: str,
    attention: np.ndarray,
    tumour_coverage: np.ndarray,
    *,
    top_fraction: float = TOP_FRACTION,
    min_coverage: float = TUMOUR_TILE_MIN_COVERAGE,
) -> TumourLocalisation:
    """Compare one bag's attention (N,) or (H, N) with each tile's tumour coverage (N,)."""
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim == 2:
        att = att.mean(axis=0)  # multi-head attention: mean over heads
    cov = np.asarray(tumour_coverage, dtype=np.float64)
    if att.shape != cov.shape:
        raise MilkitError(
            "attention and tile coverage differ in length",
            value={"attention": att.shape, "coverage": cov.shape},
            hint=f"The bag of {slide_id} does not match its slide's tiles",
        )
    n = int(att.size)
    tumour = cov >= min_coverage
    if n == 0:
        return TumourLocalisation(slide_id, 0, 0, 0, math.nan, math.nan, math.nan)
    k = max(1, math.ceil(top_fraction * n))
    # stable order so that equal attention (e.g. an untrained model) is reproducible
    top = np.argsort(-att, kind="stable")[:k]
    total = att.sum()
    mass = float(att[tumour].sum() / total) if total > 0 else math.nan
    return TumourLocalisation(
        slide_id=slide_id,
        n_tiles=n,
        n_tumour_tiles=int(tumour.sum()),
        top_k=k,
        top_hit_rate=float(tumour[top].mean()),
        chance=float(tumour.mean()),
        attention_mass=mass,
    )


@dataclass
class TileScores:
    """Per-tile scores of every test slide: ``attention`` (sums to 1 per slide) or, for models
    without attention (mi-net, threshold-MIL), the ``instance score`` (positive-class
    probability of each tile)."""

    kind: str
    scores: dict[str, np.ndarray]


def out_of_fold_scores(
    run_dir: str | Path, table: Any, splits: Any, *, positive_index: int = 1, device: str = "cpu"
) -> TileScores:
    """Tile scores of every test slide from its own fold's ``best.pt`` (see ``TileScores``).

    ``table`` is the run's ``LabelTable`` and ``splits`` its ``FoldSplit`` list; multi-head
    attention is averaged over heads.
    """
    from milkit.data.datasets import BagDataset
    from milkit.training.inference import instance_scores, load_checkpoint
    from milkit.training.trainer import predict

    kind = "attention"
    out: dict[str, np.ndarray] = {}
    for split in splits:
        ckpt = fold_dir(run_dir, split.fold) / BEST_CHECKPOINT
        if not split.test or not ckpt.is_file():
            continue
        model, _ = load_checkpoint(ckpt, map_location=device)
        dataset = BagDataset.from_table(table, split.test)
        preds = predict(model, dataset, device=device, with_attention=True)
        if preds.attention is None:
            kind = "instance score"
            out.update(instance_scores(model, dataset, positive_index))
            continue
        for sid, att in zip(preds.slide_ids, preds.attention, strict=True):
            out[sid] = att.mean(axis=0) if att.ndim == 2 else att
    return TileScores(kind, out)


def outline_mask(
    png_path: str | Path,
    mask: np.ndarray,
    mask_downsample: float,
    level0_dims: tuple[int, int],
    thumb_shape: tuple[int, int],
) -> Path:
    """Draw the contour of a level-0-aligned low-resolution ``mask`` onto a heatmap PNG.

    ``milkit.evaluation.heatmap.draw_heatmap`` puts the thumbnail-sized heatmap in the PNG's top-left
    corner; ``thumb_shape`` (h, w) is that thumbnail's size. The outline is black with a white
    core so it stays visible on every colour of the map. Rewrites the PNG atomically.
    """
    import cv2

    path = Path(png_path)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise MilkitError("cannot read the heatmap PNG", path=path)
    th, tw = thumb_shape
    sx = tw / float(level0_dims[0]) * mask_downsample
    sy = th / float(level0_dims[1]) * mask_downsample
    if mask.any():
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        scaled = []
        for contour in contours:
            pts = contour.astype(np.float64)
            pts[..., 0] = (pts[..., 0] + 0.5) * sx
            pts[..., 1] = (pts[..., 1] + 0.5) * sy
            scaled.append(np.round(pts).astype(np.int32))
        heat = np.ascontiguousarray(img[:th, :tw])
        cv2.polylines(heat, scaled, True, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.polylines(heat, scaled, True, (255, 255, 255), 1, cv2.LINE_AA)
        img[:th, :tw] = heat
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise MilkitError("cannot encode the heatmap PNG", path=path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


def tumour_heatmap(
    slide_path: str | Path,
    bag_path: str | Path,
    attention: np.ndarray,
    out_png: str | Path,
    *,
    title: str,
    thumbnail_size: int = 1024,
    label: str = "log10(attn)",
) -> Path:
    """Tile-score heatmap (log scale) on the slide thumbnail, planted tumour outlined."""
    from milkit.evaluation.heatmap import draw_heatmap
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.synthetic import load_synthetic_masks
    from milkit.io.bags import read_bag_coords

    coords, coords_attrs = read_bag_coords(bag_path)
    with Slide(slide_path) as slide:
        thumb = slide.thumbnail(thumbnail_size)
        dims = tuple(int(v) for v in slide.dimensions)
    ps = float(coords_attrs["patch_size_level0"])
    # log scale on a fixed range: a trained model's attention spans many orders of magnitude
    # (min-max scaling shows only the single top tile; rank scaling paints the background in
    # every colour), and a fixed range keeps colours comparable between slides
    scores = np.log10(np.maximum(np.asarray(attention, dtype=np.float64), 10.0**LOG_FLOOR))
    draw_heatmap(
        thumb,
        coords,
        scores,
        ps,
        dims,
        out_png,
        title=title,
        normalize="none",
        vmin=LOG_FLOOR,
        vmax=0.0,
        label=label,  # instance scores are not attention: say which
    )
    masks = load_synthetic_masks(slide_path)
    return outline_mask(out_png, masks.tumour_mask, masks.mask_downsample, dims, thumb.shape[:2])


def summarise_localisation(items: list[TumourLocalisation]) -> Mapping[str, float]:
    """Mean top-decile hit rate, chance, enrichment and attention mass over slides with tumour."""
    use = [t for t in items if t.n_tumour_tiles > 0 and t.n_tiles > 0]
    if not use:
        return {"slides": 0}
    return {
        "slides": len(use),
        "top_hit_rate": float(np.mean([t.top_hit_rate for t in use])),
        "chance": float(np.mean([t.chance for t in use])),
        "best_possible": float(np.mean([t.best_possible for t in use])),
        "enrichment": float(np.nanmean([t.enrichment for t in use])),
        "attention_mass": float(np.nanmean([t.attention_mass for t in use])),
    }


__all__ = [
    "TOP_FRACTION",
    "TUMOUR_TILE_MIN_COVERAGE",
    "TileScores",
    "TumourLocalisation",
    "out_of_fold_scores",
    "outline_mask",
    "summarise_localisation",
    "tumour_heatmap",
    "tumour_localisation",
]
