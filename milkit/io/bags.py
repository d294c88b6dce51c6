"""HDF5 bag I/O: the contract between preprocessing and training (docs/architecture.md §4).

One ``<slide_id>.h5`` per slide with ``features`` (N, D) and ``coords`` (N, 2) level-0 top-left
pixels in raster order, plus provenance attributes. Files are readable unchanged by CLAM and
TRIDENT (they index datasets by name); we also read their outputs and legacy ``.pt`` tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from milkit.errors import MilkitError, one_line, refused_global, tidy_floats
from milkit.io.atomic import PARTIAL_SUFFIX, atomic_path

FORMAT_VERSION = 1
BAG_SUFFIXES = (".h5", ".hdf5", ".pt")
COORDS_FRAME = "level0_px_top_left"
_CHUNK_BYTES = 2 * 1024 * 1024  # ~2 MiB row blocks: fast sequential reads, cheap slicing


def to_attr(value: Any) -> Any:
    """Convert a Python value into something HDF5 stores and CLAM/TRIDENT can read back."""
    if value is None:
        return "None"  # TRIDENT's convention for missing values
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
        return json.dumps(list(value), default=str)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return tidy_floats(value)  # 0.24999999999999997 → 0.25: attrs are read by people too
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: _from_attr(attrs[key]) for key in attrs}


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per HDF5 chunk so that one chunk holds about 2 MiB."""
    return max(1, _CHUNK_BYTES // max(1, dim * itemsize))


def raster_order(coords: np.ndarray) -> np.ndarray:
    """Indices that sort level-0 coordinates in canonical raster order (by y, then x)."""
    coords = np.asarray(coords)
    if len(coords) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((coords[:, 0], coords[:, 1]))


@dataclass(frozen=True)
class Bag:
    """One slide's bag as loaded from disk.

    ``coords`` is None only for legacy ``.pt`` bags, which carry features alone.
    """

    path: Path
    features: np.ndarray
    coords: np.ndarray | None
    features_attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    root_attrs: dict[str, Any] = field(default_factory=dict)
    source: str = "milkit"  # "milkit" | "trident" | "clam" | "pt"

    @property
    def num_instances(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def slide_id(self) -> str:
        return str(self.root_attrs.get("slide_id", slide_id_from_path(self.path)))


@dataclass(frozen=True)
class BagHeader:
    """Shape and attributes of a bag, read without loading its features."""

    path: Path
    num_instances: int
    dim: int
    dtype: str
    has_coords: bool
    features_attrs: dict[str, Any]
    coords_attrs: dict[str, Any]
    root_attrs: dict[str, Any]
    source: str


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """Slide id of a bag file: its name without the bag suffix (``.h5``, ``.hdf5``, ``.pt``).

    Nothing else is stripped: TRIDENT's ``<id>_patches.h5`` files hold coordinates only and are
    never read as bags (``milkit.io.bag_folders``), and a slide may itself end in ``_patches``.
    """
    name = Path(path).name
    for suffix in BAG_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name


def write_bag(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    *,
    coords_attrs: Mapping[str, Any] | None = None,
    features_attrs: Mapping[str, Any] | None = None,
    root_attrs: Mapping[str, Any] | None = None,
    dtype: str | np.dtype = "float32",
) -> Path:
    """Write one bag atomically (``.partial`` → fsync → ``os.replace``).

    Rows are put into canonical raster order (sort by y, then x) if they are not already.

    Args:
        path: destination ``<slide_id>.h5``.
        features: (N, D) instance features; N may be 0 (a slide without tissue).
        coords: (N, 2) level-0 (x, y) of each tile's top-left corner.
        coords_attrs: patch geometry (TRIDENT + CLAM + milkit keys, docs/architecture.md §4).
        features_attrs: encoder provenance (``encoder``, ``embed_dim``, ``precision``, ...).
        root_attrs: slide provenance (``slide_id``, ``slide_path``, ``slide_sha256``, ...).
        dtype: ``float32`` (default) or ``float16``.
    """
    from milkit import __version__

    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise MilkitError("bag dtype must be float32 or float16", value=str(dtype), path=path)
    if features.ndim != 2:
        raise MilkitError("features must be a 2-D array (N, D)", value=features.shape, path=path)
    if coords.shape != (features.shape[0], 2):
        raise MilkitError(
            f"coords must have shape ({features.shape[0]}, 2) to match features",
            value=coords.shape,
            path=path,
        )
    order = raster_order(coords)
    if len(order) and not np.array_equal(order, np.arange(len(order))):
        features, coords = features[order], coords[order]
    n, dim = features.shape
    rows = chunk_rows(dim, dtype.itemsize)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset(
            "features",
            data=features.astype(dtype, copy=False),
            maxshape=(None, dim),
            chunks=(max(1, min(rows, n)), max(1, dim)),
        )
        crd = f.create_dataset(
            "coords",
            data=coords.astype(np.int64, copy=False),
            maxshape=(None, 2),
            chunks=(max(1, min(chunk_rows(2, 8), n)), 2),
        )
        cattrs = {"coords_frame": COORDS_FRAME, **dict(coords_attrs or {})}
        for key, value in cattrs.items():
            crd.attrs[key] = to_attr(value)
        fattrs = {"embed_dim": dim, "precision": dtype.name, **dict(features_attrs or {})}
        for key, value in fattrs.items():
            feats.attrs[key] = to_attr(value)
        rattrs = {
            "milkit_format": FORMAT_VERSION,
            "created_by": f"milkit {__version__}",
            "slide_id": slide_id_from_path(path),
            **dict(root_attrs or {}),
        }
        for key, value in rattrs.items():
            f.attrs[key] = to_attr(value)
    return path


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError as err:
        raise MilkitError("bag file not found", path=path) from err
    except OSError as err:
        raise MilkitError(
            f"cannot open bag as HDF5 ({err})",
            path=path,
            hint="The file is corrupt or incomplete; delete it and rerun preprocessing",
        ) from err


def _h5_source(f: h5py.File) -> str:
    if "milkit_format" in f.attrs:
        return "milkit"
    if "coords" in f and "level0_magnification" in f["coords"].attrs:
        return "trident"
    return "clam"


def _check_h5_layout(f: h5py.File, path: Path) -> None:
    if "features" not in f:
        keys = sorted(f.keys())
        hint = "Pass the feature file (with a 'features' dataset), not the patch/coords file"
        raise MilkitError(f"bag has no 'features' dataset (datasets: {keys})", path=path, hint=hint)
    ds = f["features"]
    if ds.ndim != 2:
        raise MilkitError("bag 'features' must be 2-D (N, D)", value=ds.shape, path=path)
    if "coords" in f and f["coords"].shape != (ds.shape[0], 2):
        raise MilkitError(
            f"bag 'coords' shape does not match features ({ds.shape[0]}, 2)",
            value=f["coords"].shape,
            path=path,
        )


def read_bag_header(path: str | os.PathLike[str]) -> BagHeader:
    """Shape, dtype and attributes of a bag without reading its features."""
    path = Path(path)
    if path.suffix == ".pt":
        bag = read_bag(path)
        return BagHeader(
            path, bag.num_instances, bag.dim, str(bag.features.dtype), False, {}, {}, {}, "pt"
        )
    with _open_h5(path) as f:
        _check_h5_layout(f, path)
        ds = f["features"]
        has_coords = "coords" in f
        return BagHeader(
            path=path,
            num_instances=int(ds.shape[0]),
            dim=int(ds.shape[1]),
            dtype=str(ds.dtype),
            has_coords=has_coords,
            features_attrs=_attrs_dict(ds.attrs),
            coords_attrs=_attrs_dict(f["coords"].attrs) if has_coords else {},
            root_attrs=_attrs_dict(f.attrs),
            source=_h5_source(f),
        )


# numpy objects a ``torch.save(np.ndarray)`` pickle refers to (TRIDENT's ``saveas='pt'``): the
# array rebuild function, the array and dtype types and the numeric dtype classes. These
# construct plain numeric arrays only; every other global stays refused by ``weights_only``.
# ``numpy.core`` is numpy 1.x's name of ``numpy._core`` (files written with numpy < 2). An empty
# array (TRIDENT's slide without tissue) pickles its data as ``__builtin__.bytes()``, a constructor
# that cannot run code.
_NUMERIC_DTYPE_CLASSES = [
    "BoolDType",
    "Float16DType",
    "Float32DType",
    "Float64DType",
    "Int8DType",
    "Int16DType",
    "Int32DType",
    "Int64DType",
    "UInt8DType",
    "UInt16DType",
    "UInt32DType",
    "UInt64DType",
]


def _numpy_pickle_globals() -> list[Any]:
    """The allow-list handed to ``torch.serialization.safe_globals`` for ``.pt`` bags."""
    from numpy._core.multiarray import _reconstruct

    allowed: list[Any] = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        bytes,  # "__builtin__.bytes" in protocol 2, mapped to builtins by the unpickler
    ]
    for name in _NUMERIC_DTYPE_CLASSES:
        cls = getattr(np.dtypes, name)
        allowed += [cls, (cls, f"numpy.dtypes.{name}")]
    return allowed


def _read_pt(path: Path) -> Bag:
    """Read a ``.pt`` bag: a tensor (CLAM ``pt_files/``) or a numpy array (TRIDENT ``saveas='pt'``).

    Loaded with ``weights_only=True`` plus the numpy allow-list above, so a pickle that would call
    anything else (os.system, a custom class) is refused before it runs.

    Raises:
        MilkitError: one line naming the file, for a refused global, a corrupt file, or content
            that is not an (N, D) floating-point array.
    """
    import pickle
    import warnings

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_pickle_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # old pickle protocols warn
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = refused_global(err) or one_line(str(err), limit=200)
        raise MilkitError(
            f"refusing to load .pt bag: it needs {what}, which is not a tensor or numpy array "
            "(loading it could run code)",
            path=path,
            hint="A .pt bag must hold one (N, D) tensor or numpy array; only load files you trust",
        ) from None
    except Exception as err:
        raise MilkitError(
            f"cannot load .pt bag ({type(err).__name__}: {one_line(str(err), limit=200)})",
            path=path,
            hint="The file is truncated or not a PyTorch file; re-extract its features",
        ) from None
    if isinstance(obj, torch.Tensor):
        arr = obj.float().numpy() if obj.dtype == torch.bfloat16 else obj.numpy()
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise MilkitError(
            f".pt bag must hold one (N, D) tensor or numpy array, got {type(obj).__name__}",
            path=path,
        )
    if arr.dtype.kind != "f":
        raise MilkitError(
            ".pt bag features must be floating point", value=str(arr.dtype), path=path
        )
    if arr.ndim == 1 and arr.size == 0:  # TRIDENT's file for a slide without tissue tiles
        raise MilkitError(
            ".pt bag is empty (no tiles) and records no feature dimension",
            value=arr.shape,
            path=path,
            hint="The slide had no tissue tiles; leave it out of the labels CSV",
        )
    if arr.ndim != 2:
        raise MilkitError(".pt bag must hold an (N, D) array", value=arr.shape, path=path)
    return Bag(path=path, features=np.ascontiguousarray(arr), coords=None, source="pt")


def _raw_plan(ds: h5py.Dataset) -> list[tuple[int, int, int]] | None:
    """File byte ranges of an uncompressed dataset as (row_start, row_stop, file_offset), or
    None when the fast path does not apply (filters, foreign byte order, partial chunks, ...).

    Bags are written row-chunked without filters (docs/architecture.md §4), so the features are a few
    contiguous byte runs that can be read straight into the output array.
    """
    n, dim = ds.shape
    dtype = ds.dtype
    if dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        return None
    if dtype.kind != "f" or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset:
        return None
    if ds.external or ds.is_virtual:
        return None
    dsid = ds.id
    if ds.chunks is None:
        offset = dsid.get_offset()
        return None if offset is None else [(0, n, int(offset))]
    rows, cols = ds.chunks
    if cols != dim:
        return None
    count = dsid.get_num_chunks()
    if count != -(-n // rows):
        return None
    chunk_bytes = rows * dim * dtype.itemsize
    plan = []
    for k in range(count):
        info = dsid.get_chunk_info(k)
        if info.filter_mask or info.size != chunk_bytes or info.byte_offset is None:
            return None
        start = int(info.chunk_offset[0])
        plan.append((start, min(n, start + rows), int(info.byte_offset)))
    plan.sort()
    return plan


def _pread_into(path: Path, out: np.ndarray, plan: list[tuple[int, int, int]]) -> bool:
    """Fill ``out`` from the byte ranges of ``plan``; False if the file came up short."""
    row_bytes = out.shape[1] * out.dtype.itemsize
    flat = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, stop, offset in plan:
            want = (stop - start) * row_bytes
            view = flat[start * row_bytes : start * row_bytes + want]
            done = 0
            while done < want:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    return False
                done += got
    finally:
        os.close(fd)
    return True


def _read_float16_as_float32(
    path: Path, ds: h5py.Dataset, plan: list[tuple[int, int, int]]
) -> np.ndarray:
    """Read a float16 bag straight from its byte ranges and widen it to float32 in one call.

    One bulk conversion (torch's vectorised half→float kernel) is ~6× faster here than
    converting in small cache-sized steps, whose per-call cost dominated (measured 0.23 s vs
    0.04 s for 10^7 values).
    """
    import torch  # imported here: the bag format itself does not need torch

    half = np.empty(ds.shape, dtype=np.float16)
    if not _pread_into(path, half, plan):
        return ds[()].astype(np.float32)
    return torch.from_numpy(half).to(torch.float32).numpy()


def _read_features(path: Path, ds: h5py.Dataset, *, as_float32: bool) -> np.ndarray:
    """The (N, D) ``features`` of an open bag, in the stored dtype or widened to float32.

    Uncompressed bags (ours, TRIDENT's, CLAM's) are read with ``os.preadv`` straight from the
    chunk byte ranges into the output array (about twice as fast as HDF5's own read path, which
    goes through its chunk cache); anything else, or a file that comes up short, falls back to
    ``read_direct``.
    """
    plan = _raw_plan(ds) if ds.size and hasattr(os, "preadv") else None
    if plan is not None and as_float32 and ds.dtype == np.float16:
        return _read_float16_as_float32(path, ds, plan)
    out = np.empty(ds.shape, dtype=ds.dtype)
    if out.size and (plan is None or not _pread_into(path, out, plan)):
        ds.read_direct(out)
    return out.astype(np.float32) if as_float32 and out.dtype != np.float32 else out


def _read_coords(f: h5py.File) -> np.ndarray | None:
    if "coords" not in f:
        return None
    cds = f["coords"]
    coords = np.empty(cds.shape, dtype=np.int64)
    if coords.size:
        cds.read_direct(coords)
    return coords


def read_bag(path: str | os.PathLike[str], *, load_coords: bool = True) -> Bag:
    """Load a bag written by milkit, TRIDENT or CLAM (``.h5``) or a legacy ``.pt`` tensor."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise MilkitError("refusing to read an incomplete bag (.partial)", path=path)
    if path.suffix == ".pt":
        if not path.exists():
            raise MilkitError("bag file not found", path=path)
        return _read_pt(path)
    with _open_h5(path) as f:
        _check_h5_layout(f, path)
        ds = f["features"]
        return Bag(
            path=path,
            features=_read_features(path, ds, as_float32=False),
            coords=_read_coords(f) if load_coords else None,
            features_attrs=_attrs_dict(ds.attrs),
            coords_attrs=_attrs_dict(f["coords"].attrs) if "coords" in f else {},
            root_attrs=_attrs_dict(f.attrs),
            source=_h5_source(f),
        )


def read_bag_arrays(
    path: str | os.PathLike[str], *, load_coords: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features as float32 (N, D) and level-0 coords as int64 (N, 2) (None when the bag has
    none or ``load_coords`` is False): the reader of training and prediction.

    The same file checks as ``read_bag`` (errors name the file); float16 bags are widened in
    one bulk conversion. Legacy ``.pt`` bags go through ``read_bag``.

    Raises:
        MilkitError: missing, partial, unreadable or malformed bag.
    """
    path = Path(path)
    if path.suffix == ".pt" or path.name.endswith(PARTIAL_SUFFIX):
        bag = read_bag(path, load_coords=load_coords)
        return bag.features.astype(np.float32, copy=False), bag.coords
    with _open_h5(path) as f:
        _check_h5_layout(f, path)
        features = _read_features(path, f["features"], as_float32=True)
        return features, (_read_coords(f) if load_coords else None)


def read_bag_coords(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Level-0 tile coords (N, 2) int64 and the ``coords`` attributes of an HDF5 bag, without its
    features (heatmaps, tile exports).

    Raises:
        MilkitError: unreadable bag, or a bag without a ``coords`` dataset (``.pt`` bags have
            none).
    """
    header = read_bag_header(path)
    if not header.has_coords:
        raise MilkitError(
            "bag has no tile coordinates, so nothing can be placed on the slide",
            path=path,
            hint="Heatmaps and tile exports need an HDF5 bag with a 'coords' dataset",
        )
    with _open_h5(Path(path)) as f:
        return _read_coords(f), dict(header.coords_attrs)  # type: ignore[return-value]


def positive_attr(value: Any) -> bool:
    """True when an attribute holds a finite number > 0 (first element of an array)."""
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return False
    return arr.size > 0 and bool(np.isfinite(arr[0])) and arr[0] > 0


def bag_patch_size_level0(
    coords_attrs: Mapping[str, Any], coords: np.ndarray, path: str | os.PathLike[str]
) -> float:
    """Tile side in level-0 pixels: milkit/TRIDENT ``patch_size_level0``, else CLAM's
    ``patch_size`` × the patch level's ``downsample``, else the grid step between neighbouring
    tiles of ``coords`` (N, 2).

    Raises:
        MilkitError: none of these can tell (names the bag ``path``).
    """
    if positive_attr(coords_attrs.get("patch_size_level0")):
        return float(coords_attrs["patch_size_level0"])
    if positive_attr(coords_attrs.get("patch_size")) and positive_attr(
        coords_attrs.get("downsample")
    ):
        ds = np.asarray(coords_attrs["downsample"], dtype=np.float64).ravel()
        return float(coords_attrs["patch_size"]) * float(ds[0])
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)] if len(coords) > 1 else []
    positive = [int(s[s > 0].min()) for s in steps if (s > 0).any()]
    if positive:
        return float(min(positive))
    raise MilkitError(
        "cannot tell the tile size of the bag (no patch_size_level0 attribute)",
        path=path,
        hint="Pass patch_size_level0=... explicitly",
    )


_SCAN_CHUNK_BYTES = 16 * 1024 * 1024  # the NaN/inf scan reads ~16 MiB at a time


def features_are_finite(path: str | os.PathLike[str]) -> bool:
    """True when every feature value of the bag is finite; HDF5 bags are scanned in ~16 MiB
    blocks, so a large bag is checked without holding it in memory.

    Raises:
        MilkitError: missing, partial or unreadable bag.
    """
    path = Path(path)
    if path.suffix == ".pt" or path.name.endswith(PARTIAL_SUFFIX):
        return bool(np.isfinite(read_bag(path).features).all())
    with _open_h5(path) as f:
        _check_h5_layout(f, path)
        ds = f["features"]
        n, dim = ds.shape
        if n == 0:
            return True
        rows = max(1, _SCAN_CHUNK_BYTES // max(1, dim * ds.dtype.itemsize))
        buf = np.empty((min(rows, n), dim), dtype=ds.dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            view = buf[: stop - start]
            ds.read_direct(view, np.s_[start:stop])
            if not np.isfinite(view).all():
                return False
    return True


def is_complete_bag(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a finished milkit bag (used by resume: everything else is redone)."""
    path = Path(path)
    if not path.is_file() or path.name.endswith(PARTIAL_SUFFIX):
        return False
    try:
        with h5py.File(path, "r") as f:
            return "milkit_format" in f.attrs and "features" in f and "coords" in f
    except OSError:
        return False


def find_bag(bags_dir: str | os.PathLike[str], slide_id: str) -> Path | None:
    """Locate the bag of ``slide_id`` in ``bags_dir`` (``.h5`` first, then ``.hdf5``, ``.pt``)."""
    bags_dir = Path(bags_dir)
    for suffix in BAG_SUFFIXES:
        candidate = bags_dir / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def list_bags(bags_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """All bags in a folder by slide id (``.h5`` preferred over ``.pt`` for the same id)."""
    bags_dir = Path(bags_dir)
    if not bags_dir.is_dir():
        raise MilkitError("bags folder not found", path=bags_dir)
    found: dict[str, Path] = {}
    for suffix in reversed(BAG_SUFFIXES):
        for p in sorted(bags_dir.glob(f"*{suffix}")):
            found[slide_id_from_path(p)] = p
    return dict(sorted(found.items()))
