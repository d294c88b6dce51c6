"""Per-tile scores and top-k tiles out of milkit: what CLAM's ``create_heatmaps`` and TRIDENT's
top-k export give their users, from a milkit run.

- ``write_tile_scores``: one slide's per-tile scores with their level-0 coordinates, as CSV
  (``slide_id, tile, x, y, score, rank``) or HDF5 (``coords`` (N, 2) int64 and ``scores`` (N,)
  float32 datasets, CLAM/TRIDENT-style ``coords`` naming), chosen by the file suffix. Rows keep
  the bag's row order, so ``tile`` indexes the bag's ``features``/``coords``.
- ``save_top_tiles``: the ``k`` highest-scoring tiles cut out of the slide as PNGs.

Scores are what the caller computed — attention averaged over heads and over the selected
fold checkpoints (``milkit heatmap``, ``milkit predict --attention``), or instance scores for
models without attention. Writes are atomic.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_path

SCORE_SUFFIXES = (".csv", ".h5", ".hdf5")
TILE_PX = 192  # default side of a saved top-k tile (px)


def _checked(coords: np.ndarray, scores: np.ndarray, where: Any) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise MilkitError("coords must be (N, 2) level-0 (x, y)", value=coords.shape, path=where)
    if scores.shape != (len(coords),):
        raise MilkitError(
            f"{scores.size} scores for {len(coords)} tiles (a score per tile is needed)",
            value=scores.shape, path=where,
        )  # fmt: skip
    return coords.astype(np.int64), scores


def write_tile_scores(
    path: str | Path,
    slide_id: str,
    coords: np.ndarray,
    scores: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's per-tile scores (atomic). Returns the path.

    Args:
        path: ``.csv`` or ``.h5``/``.hdf5``.
        slide_id: the slide the bag belongs to.
        coords: (N, 2) level-0 pixel (x, y) of each tile's top-left corner (the bag's coords).
        scores: (N,) one score per tile, in the bag's row order.
        attrs: facts stored with the scores (HDF5 root attributes; CSV ignores them): e.g.
            ``kind`` ("attention"), ``run``, ``folds``, ``patch_size_level0``.

    Raises:
        MilkitError: unknown suffix, or coords/scores of different lengths.
    """
    path = Path(path)
    if path.suffix.lower() not in SCORE_SUFFIXES:
        raise MilkitError(
            "tile scores are written as CSV or HDF5", value=path.suffix, path=path,
            hint="Name the file .csv, .h5 or .hdf5",
        )  # fmt: skip
    coords, scores = _checked(coords, scores, path)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.DataFrame({"slide_id": slide_id, "tile": np.arange(len(scores)),
                              "x": coords[:, 0], "y": coords[:, 1], "score": scores,
                              "rank": rank})  # fmt: skip
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.8g")
        return path
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=coords)
        f.create_dataset("scores", data=scores.astype(np.float32))
        f.create_dataset("rank", data=rank)
        f.attrs["slide_id"] = slide_id
        f.attrs["coords_frame"] = "level0_px_top_left"
        for key, value in (attrs or {}).items():
            f.attrs[key] = value if not isinstance(value, (list, tuple)) else np.asarray(value)
    return path


def read_tile_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(coords (N, 2), scores (N,))`` of a file written by ``write_tile_scores``."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.read_csv(path)
        return frame[["x", "y"]].to_numpy(np.int64), frame["score"].to_numpy(np.float64)
    import h5py

    with h5py.File(path, "r") as f:
        return f["coords"][:], f["scores"][:].astype(np.float64)


def save_top_tiles(
    slide_path: Path,
    bag_path: Path,
    scores: np.ndarray,
    k: int,
    out_dir: Path,
    slide_id: str,
    *,
    tile_px: int = TILE_PX,
) -> list[tuple[Path, int, float, tuple[int, int]]]:
    """Cut the ``k`` highest-scoring tiles out of the slide as ``tile_px`` px PNGs (atomic).

    Tiles are read at the pyramid level closest to ``tile_px`` px per tile (never coarser) from
    their level-0 coordinates and named ``<slide_id>_top<rank>.png``. Returns
    ``(png, rank, score, (x, y))`` per tile.

    Raises:
        MilkitError: the bag has no coords, or ``scores`` does not have one value per tile.
    """
    from PIL import Image

    from milkit.feature_extraction.slides import Slide
    from milkit.io.bags import bag_patch_size_level0, read_bag

    bag = read_bag(bag_path)
    if bag.coords is None:
        raise MilkitError("bag has no coords, so its tiles cannot be located", path=bag_path)
    coords, scores = _checked(bag.coords, scores, bag_path)
    ps0 = bag_patch_size_level0(bag.coords_attrs, coords, bag_path)
    order = np.argsort(-scores, kind="stable")[:k]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    with Slide(slide_path) as slide:
        level = slide.best_level_for_downsample(max(1.0, ps0 / tile_px))
        ds = float(slide.level_downsamples[level])
        size = max(1, round(ps0 / ds))
        for rank, i in enumerate(order, start=1):
            x, y = (int(v) for v in coords[i])
            tile = slide.read_region((x, y), level, (size, size))
            img = Image.fromarray(np.asarray(tile, dtype=np.uint8)).resize(
                (tile_px, tile_px), Image.Resampling.LANCZOS
            )
            png = out_dir / f"{slide_id}_top{rank}.png"
            with atomic_path(png) as tmp:
                img.save(tmp, format="PNG")
            out.append((png, rank, float(scores[i]), (x, y)))
    return out
