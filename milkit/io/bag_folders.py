"""Find the folder of bags inside the trees users already have (TRIDENT jobs, CLAM outputs).

``--bags`` (and every other bag-folder argument) accepts:

* a flat folder of ``<slide_id>.h5``/``.hdf5``/``.pt`` bags (``milkit preprocess --out``, a
  TRIDENT ``features_<encoder>/`` folder, CLAM's ``h5_files/`` or ``pt_files/``);
* a CLAM feature folder, the parent of ``h5_files/`` and ``pt_files/`` (CLAM's
  ``extract_features_fp.py --feat_dir``). ``h5_files/`` is used (it has the coords heatmaps
  need) when both hold the same slides with the same bag shape; otherwise the choice is refused;
* a TRIDENT tiling folder ``<mag>x_<ps>px_<ov>px_overlap/`` with ``features_<encoder>/`` inside
  (TRIDENT ``Processor.run_patch_feature_extraction_job``);
* a TRIDENT job folder (``--job_dir``) holding one or more tiling folders.

More than one candidate (two encoders, two magnifications, h5/pt files that disagree) is an
error that lists them: choosing one silently would train on features the user did not mean.
TRIDENT's ``slide_features_<encoder>/`` (one vector per slide) and ``patches/`` (coords only)
are never taken as bags.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from milkit.errors import MilkitError
from milkit.io.bags import BAG_SUFFIXES, list_bags

CLAM_FOLDERS = ("h5_files", "pt_files")  # CLAM extract_features_fp.py: feat_dir/{h5,pt}_files
TRIDENT_FEATURES = re.compile(r"^features_(.+)$")  # patch features; not slide_features_<enc>
# Processor: f"{mag}x_{patch_size}px_{overlap}px_overlap" (mag printed as 20, 2.5, ...)
TRIDENT_TILING = re.compile(r"^(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap$")
LAYOUTS = ("flat", "clam", "trident-tiling", "trident-job")


@dataclass(frozen=True)
class BagFolder:
    """Where the bags of a given folder are.

    Attributes:
        path: the folder holding ``<slide_id>.h5``/``.hdf5``/``.pt`` files.
        given: the folder the user named.
        layout: one of ``LAYOUTS``: how ``path`` was found from ``given``.
        num_bags: bags in ``path``.
        note: one line for the user when ``path`` differs from ``given`` (else None).
    """

    path: Path
    given: Path
    layout: str
    num_bags: int
    note: str | None = None


def _pass(flag: str) -> str:
    return f"{flag} " if flag else ""


def _count(folder: Path) -> int:
    return len(list_bags(folder)) if folder.is_dir() else 0


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _trident_features(tiling: Path) -> list[Path]:
    return [p for p in _subdirs(tiling) if TRIDENT_FEATURES.match(p.name) and _count(p)]


def _show(folder: Path, base: Path) -> str:
    rel = folder.relative_to(base) if folder != base else Path(".")
    return f"{rel.as_posix()} ({_count(folder)} bags)"


def _ambiguous(given: Path, kind: str, candidates: list[Path], flag: str, why: str) -> MilkitError:
    listed = ", ".join(_show(c, given) for c in candidates)
    return MilkitError(
        f"{kind} holds {len(candidates)} bag folders ({why}): {listed}",
        path=given,
        hint=f"Pick one: {_pass(flag)}{candidates[0]} (or another of those listed)",
    )


def _clam_pair(given: Path, flag: str) -> Path:
    """h5_files/ when h5_files/ and pt_files/ hold the same bags, else an error naming both."""
    h5, pt = given / "h5_files", given / "pt_files"
    h5_bags, pt_bags = list_bags(h5), list_bags(pt)
    if set(h5_bags) != set(pt_bags):
        only_h5 = sorted(set(h5_bags) - set(pt_bags))
        only_pt = sorted(set(pt_bags) - set(h5_bags))
        why = f"h5_files only: {only_h5[:3]}; pt_files only: {only_pt[:3]}"
        raise _ambiguous(given, "CLAM feature folder", [h5, pt], flag, f"different slides; {why}")
    # Same slides: compare one bag's shape (N, D). A .pt header means loading the tensor, so one
    # slide is checked, not all: CLAM writes both files of a slide from the same array.
    from milkit.io.bags import read_bag_header

    sid = next(iter(h5_bags))
    a, b = read_bag_header(h5_bags[sid]), read_bag_header(pt_bags[sid])
    if (a.num_instances, a.dim) != (b.num_instances, b.dim):
        why = f"{sid}: {a.num_instances}x{a.dim} in h5_files, {b.num_instances}x{b.dim} in pt_files"
        raise _ambiguous(given, "CLAM feature folder", [h5, pt], flag, f"different bags; {why}")
    return h5


def _looked_in(given: Path) -> str:
    return (
        f"{given}/<slide_id>{{{','.join(BAG_SUFFIXES)}}}, {given}/h5_files/, {given}/pt_files/, "
        f"{given}/features_<encoder>/, {given}/<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/"
    )


def _nothing_found(given: Path, flag: str) -> MilkitError:
    hints = []
    others = [p for p in _subdirs(given) if _count(p)]
    if others:
        hints.append("these subfolders hold bags: " + ", ".join(_show(p, given) for p in others))
    if given.name == "patches" or any(
        (t / "patches").is_dir() for t in [given, *_subdirs(given)] if TRIDENT_TILING.match(t.name)
    ):
        hints.append(
            "TRIDENT's patches/ hold coords only; run TRIDENT's feature extraction "
            "(--task feat) or milkit preprocess to get features_<encoder>/"
        )
    if any(p.name.startswith("slide_features_") for p in _subdirs(given)):
        hints.append("slide_features_<encoder>/ holds one vector per slide, not bags of tiles")
    hint = f"Pass the folder of bags{f' with {flag}' if flag else ''}"
    if hints:
        hint += "; " + "; ".join(hints)
    return MilkitError(
        f"no bags found; milkit looked in {_looked_in(given)}", path=given, hint=hint
    )


def resolve_bag_folder(path: str | os.PathLike[str], *, flag: str = "--bags") -> BagFolder:
    """The folder of bags that ``path`` names directly or through a CLAM/TRIDENT tree.

    Args:
        path: a flat bag folder, a CLAM feature folder, or a TRIDENT tiling/job folder.
        flag: how the user passes the folder (for the error hints), e.g. ``--bags``.

    Returns:
        ``BagFolder``; ``path`` unchanged (layout ``flat``) when it holds bags itself.

    Raises:
        MilkitError: the folder does not exist or is a file; more than one candidate folder
            (listed, with how to pick one); no bags anywhere milkit looks (the places are listed).
    """
    given = Path(path)
    if not given.exists():
        raise MilkitError("bags folder not found", path=given)
    if not given.is_dir():
        raise MilkitError(
            "expected a folder of bags, got a file",
            path=given,
            hint=f"Pass the folder that holds it{f' with {flag}' if flag else ''}",
        )
    if given.name == "patches" and TRIDENT_TILING.match(given.parent.name):
        raise MilkitError(
            "this is TRIDENT's patches/ folder (coords only, no features)",
            path=given,
            hint=f"Pass {_pass(flag)}{given.parent}/features_<encoder>",
        )
    direct = _count(given)
    clam = [given / n for n in CLAM_FOLDERS if _count(given / n)]
    features = _trident_features(given)
    tilings = [t for t in _subdirs(given) if TRIDENT_TILING.match(t.name)]
    nested = [f for t in tilings for f in _trident_features(t)]
    if direct:
        if clam or features or nested:  # bags here and in a known subfolder: which ones?
            raise _ambiguous(
                given, "folder", [given, *clam, *features, *nested], flag,
                "bags in the folder itself and in subfolders",
            )  # fmt: skip
        return BagFolder(given, given, "flat", direct)
    found: list[tuple[str, Path]] = []
    if clam:
        chosen = clam[0] if len(clam) == 1 else _clam_pair(given, flag)
        found.append(("clam", chosen))
    found += [("trident-tiling", f) for f in features]
    found += [("trident-job", f) for f in nested]
    if not found:
        raise _nothing_found(given, flag)
    if len(found) > 1:
        kinds = {k for k, _ in found}
        if kinds <= {"trident-tiling"}:
            kind, why = "TRIDENT tiling folder", "one per encoder"
        elif kinds <= {"trident-job"}:
            kind, why = "TRIDENT job folder", "one per tiling and encoder"
        else:
            kind, why = "folder", "CLAM and TRIDENT layouts"
        raise _ambiguous(given, kind, [f for _, f in found], flag, why)
    layout, folder = found[0]
    n = _count(folder)
    what = {
        "clam": "CLAM feature folder",
        "trident-tiling": "TRIDENT tiling folder",
        "trident-job": "TRIDENT job folder",
    }[layout]
    note = f"{given} is a {what}; reading the {n} bags in {folder}"
    return BagFolder(folder, given, layout, n, note)


def bag_folder_for_cli(path: Path, prog: str, *, flag: str = "--bags") -> Path:
    """``resolve_bag_folder(path).path`` for a command; says which folder it reads (rank 0 only,
    once under torchrun) on stderr."""
    folder = resolve_bag_folder(path, flag=flag)
    if folder.note and int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: note: {folder.note}", file=sys.stderr)
    return folder.path


def missing_bags_hint(bags_dir: str | os.PathLike[str], missing: list[str]) -> str:
    """Where milkit looked for the bags of ``missing`` slide ids, and what the folder holds
    instead (for the "missing bag" error)."""
    bags_dir = Path(bags_dir)
    if not missing:
        return ""
    sid = missing[0]
    looked = ", ".join(str(bags_dir / f"{sid}{s}") for s in BAG_SUFFIXES)
    text = f"milkit looked for {looked}"
    present = list_bags(bags_dir) if bags_dir.is_dir() else {}
    if present:
        some = ", ".join(list(present)[:3])
        text += f"; the folder holds {len(present)} bag(s) named like: {some}"
    return text
