"""Export milkit bags to the folder layouts of CLAM and TRIDENT (CLAM split files: milkit.data.splits).

CLAM (github.com/mahmoodlab/CLAM, ``dataset_modules/dataset_generic.py``): training reads
``<data_dir>/pt_files/<slide_id>.pt``, a ``torch.save`` of the float32 (N, D) feature tensor
(``extract_features_fp.py``); with ``load_from_h5(True)`` (clustering/heatmaps) it reads
``h5_files/<slide_id>.h5`` datasets ``features`` and ``coords``. Its split files
(``create_splits_seq.py``/``save_splits``) are one CSV per fold, ``splits_<k>.csv``, with an
unnamed index column and ``train,val,test`` columns of slide ids padded with empty cells, or
``splits_<k>_bool.csv`` with slide ids as index and boolean ``train,val,test`` columns.

TRIDENT (github.com/mahmoodlab/TRIDENT, ``Processor.py``, ``IO.coords_to_h5``,
``WSI.extract_features``): a job folder holds ``<mag>x_<ps>px_<ov>px_overlap/`` per tiling with
``patches/<slide>_patches.h5`` (``coords`` and its attributes ``patch_size``,
``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``,
``savetodir``, ``level0_width``, ``level0_height``) and ``features_<encoder>/<slide>.h5``
(``features`` with attributes ``name``, ``savetodir``, ``encoder``, and ``coords`` with the
patching attributes).

Every file is written atomically. Bags whose file already is what the target reads are linked
(a hard link, else a symbolic link) unless ``copy=True``; the rest are converted (CLAM's
``pt_files`` always: they are pickled tensors; float16 bags for ``h5_files``). A linked file is the
same file as the bag: edit neither in place. A slide that
cannot be exported is recorded with its reason and the others go on.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from milkit.data.splits import (  # noqa: F401  (CLAM split files are read and written by milkit.data.splits)
    is_clam_split_frame,
    read_clam_splits,
    write_clam_splits,
)
from milkit.errors import MilkitError
from milkit.io.atomic import atomic_path
from milkit.io.bags import list_bags, read_bag, read_bag_coords, read_bag_header, to_attr

EXPORT_TARGETS = ("clam", "trident")
# coords attributes TRIDENT's readers need to rebuild the patcher (WSI.extract_features,
# slide encoders' patch_size_level0); without them a bag cannot join a TRIDENT tree.
TRIDENT_COORDS_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
)


@dataclass
class ExportResult:
    """What an export did: per-slide outcome and where the files went.

    ``linked``/``written``: slide id -> list of files; ``failed``: slide id -> reason;
    ``notes``: things the user should know (e.g. slides without an ``h5_files`` entry).
    """

    out: Path
    target: str
    linked: dict[str, list[Path]] = field(default_factory=dict)
    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folders: set[Path] = field(default_factory=set)

    def _add(self, kind: str, slide_id: str, path: Path) -> None:
        getattr(self, kind).setdefault(slide_id, []).append(path)


# ---------------------------------------------------------------------------------- file helpers
def _link_or_copy(src: Path, dst: Path, *, copy: bool) -> str:
    """Put ``src`` at ``dst`` atomically: hard link, else symlink (``copy``: a copy).

    Returns ``"linked"`` or ``"written"``.
    """
    src = src.resolve()
    with atomic_path(dst) as tmp:
        if copy:
            shutil.copyfile(src, tmp)
            kind = "written"
        else:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or links not allowed
                os.symlink(src, tmp)
            kind = "linked"
    return kind


def _write_h5(
    dst: Path,
    features: np.ndarray,
    coords: np.ndarray,
    features_attrs: dict[str, Any],
    coords_attrs: dict[str, Any],
) -> None:
    """Write a plain ``features`` + ``coords`` HDF5 file (CLAM/TRIDENT layout), atomically."""
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as f:
        fds = f.create_dataset("features", data=features)
        cds = f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        for key, value in features_attrs.items():
            fds.attrs[key] = to_attr(value)
        for key, value in coords_attrs.items():
            cds.attrs[key] = to_attr(value)


# ---------------------------------------------------------------------------------- CLAM
def _export_clam_slide(
    slide_id: str, src: Path, out: Path, copy: bool, result: ExportResult
) -> None:
    import torch

    bag = read_bag(src)
    # CLAM's models are float32; a float16 tensor would fail in their first Linear layer.
    feats32 = np.ascontiguousarray(bag.features, dtype=np.float32)
    pt = out / "pt_files" / f"{slide_id}.pt"
    with atomic_path(pt) as tmp:
        torch.save(torch.from_numpy(feats32), tmp)
    result._add("written", slide_id, pt)
    if bag.coords is None:
        result.notes.append(
            f"{slide_id}: no coords (a .pt bag), so no h5_files entry; CLAM training needs only "
            "pt_files"
        )
        return
    h5 = out / "h5_files" / f"{slide_id}.h5"
    if bag.features.dtype == np.float32:  # read_bag keeps the stored dtype
        result._add(_link_or_copy(src, h5, copy=copy), slide_id, h5)
    else:  # a float16 bag: CLAM's h5 mode feeds the array to float32 layers as it is
        _write_h5(h5, feats32, bag.coords, bag.features_attrs, bag.coords_attrs)
        result._add("written", slide_id, h5)


# ---------------------------------------------------------------------------------- TRIDENT
def trident_mag_text(mag: float) -> str:
    """Magnification as TRIDENT prints it in folder names: ``20``, ``2.5`` (``Processor._fmt_mag``)."""
    m = float(mag)
    if abs(m - round(m)) < 1e-9:
        return str(round(m))
    return f"{m:g}"


def trident_tiling_folder(coords_attrs: dict[str, Any]) -> str:
    """``<mag>x_<patch_size>px_<overlap>px_overlap`` from a bag's coords attributes."""
    mag = trident_mag_text(coords_attrs["target_magnification"])
    return f"{mag}x_{int(coords_attrs['patch_size'])}px_{int(coords_attrs['overlap'])}px_overlap"


def _encoder_name(features_attrs: dict[str, Any], override: str | None) -> str | None:
    name = override or features_attrs.get("encoder")
    if name in (None, "", "None"):
        return None
    return re.sub(r"[^\w.+-]", "_", str(name))


def _export_trident_slide(
    slide_id: str, src: Path, out: Path, copy: bool, encoder: str | None, result: ExportResult
) -> None:
    bag = read_bag_header(src)  # attributes only: the features file is linked, not read
    if not bag.has_coords:
        raise MilkitError("bag has no coords (a .pt bag); TRIDENT feature files need them")
    missing = [k for k in TRIDENT_COORDS_ATTRS if k not in bag.coords_attrs]
    if missing:
        raise MilkitError(
            f"bag lacks TRIDENT coords attribute(s) {missing}",
            hint="Export bags made by `milkit preprocess` or TRIDENT (CLAM bags lack "
            "magnifications)",
        )
    enc = _encoder_name(bag.features_attrs, encoder)
    if enc is None:
        raise MilkitError("bag does not name its encoder", hint="Pass --encoder NAME")
    tiling = out / trident_tiling_folder(bag.coords_attrs)
    feat_dir = tiling / f"features_{enc}"
    result.folders.add(feat_dir)
    coords_attrs = {
        **bag.coords_attrs,
        "name": bag.coords_attrs.get("name", slide_id),
        "savetodir": str(tiling),
    }
    patches = tiling / "patches" / f"{slide_id}_patches.h5"
    with atomic_path(patches) as tmp, h5py.File(tmp, "w") as f:
        coords, _ = read_bag_coords(src)
        cds = f.create_dataset("coords", data=coords)
        for key, value in coords_attrs.items():
            cds.attrs[key] = to_attr(value)
    result._add("written", slide_id, patches)
    # The bag already is a TRIDENT feature file (datasets and the attributes its readers use);
    # features keep their dtype, as TRIDENT's own float16 extractions do.
    dst = feat_dir / f"{slide_id}.h5"
    result._add(_link_or_copy(src, dst, copy=copy), slide_id, dst)


# ---------------------------------------------------------------------------------- entry point
def export_bags(
    bags_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    target: str,
    *,
    copy: bool = False,
    encoder: str | None = None,
    slide_ids: Sequence[str] | None = None,
) -> ExportResult:
    """Export every bag of ``bags_dir`` to CLAM's or TRIDENT's layout under ``out``.

    Args:
        bags_dir: a folder of bags (``<slide_id>.h5``/``.hdf5``/``.pt``).
        out: CLAM: the ``data_dir`` (gets ``pt_files/`` and ``h5_files/``); TRIDENT: the job folder.
        target: ``"clam"`` or ``"trident"``.
        copy: copy files instead of linking them.
        encoder: TRIDENT only: the encoder name for ``features_<encoder>/`` (default: the bag's
            ``encoder`` attribute).
        slide_ids: export only these (default: all).

    Raises:
        MilkitError: unknown target, missing folder, no bags, an unknown slide id.
    """
    if target not in EXPORT_TARGETS:
        raise MilkitError(f"export target must be one of {list(EXPORT_TARGETS)}", value=target)
    from milkit.io.bag_folders import resolve_bag_folder

    bags_dir = resolve_bag_folder(bags_dir).path  # also a TRIDENT/CLAM tree
    bags = list_bags(bags_dir)
    if not bags:
        raise MilkitError("no bags (*.h5, *.hdf5, *.pt) in folder", path=bags_dir)
    if slide_ids is not None:
        unknown = sorted(set(slide_ids) - set(bags))
        if unknown:
            raise MilkitError(f"no bag for slide id(s) {unknown[:5]}", path=bags_dir)
        bags = {s: bags[s] for s in slide_ids}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out=out, target=target)
    for slide_id, src in bags.items():
        try:
            if target == "clam":
                _export_clam_slide(slide_id, src, out, copy, result)
            else:
                _export_trident_slide(slide_id, src, out, copy, encoder, result)
        except (MilkitError, OSError, ValueError, KeyError) as err:
            result.failed[slide_id] = f"{err} ({src})" if str(src) not in str(err) else str(err)
    if target == "trident" and len({p.parent for p in result.folders}) > 1:
        result.notes.append(
            "bags come from more than one tiling; TRIDENT sees one tiling folder per job run: "
            + ", ".join(sorted(p.parent.name for p in result.folders))
        )
    return result
