"""Where a cohort's bags came from: encoder, weights, feature dim, tile size and resolution.

Two encoders can give features of the same width (``resnet50-trunc`` and UNI are both 1024-d), so
a model trained on one and applied to the other fails silently. Every milkit bag records its
provenance (``features.attrs``: ``encoder``, ``encoder_weights_sha256``; root ``tile_spec``;
``coords.attrs``: ``patch_size``, ``target_mpp``, ``target_magnification``, see README "The bag
format"); TRIDENT bags record the encoder (``name``), tile size and magnification; CLAM bags only
the tile size.

The rule for bags without these attributes (other tools, hand-made test bags): a missing field is
*unrecorded*, and unrecorded is a value of its own. Bags are grouped by their ``BagSpec.key``
(encoder, weights hash, tile size, requested resolution); a training cohort must form one group,
so a cohort made entirely of attribute-less bags trains (run.json then records ``null`` fields),
while a cohort mixing recorded and unrecorded provenance is refused like any other mixture, since
it cannot be shown to be one encoder. Prediction compares the bags with the run's spec the same
way; a run trained before specs were recorded (no ``bag_spec`` in run.json) is not checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from milkit.errors import MilkitError
from milkit.io.bags import BagHeader

# Fields of ``BagSpec.key``: bags that differ in any of them must not be mixed. The feature
# dimension is checked on its own (a dim mismatch breaks training outright).
KEY_FIELDS = ("encoder", "encoder_weights_sha256", "patch_size", "resolution")
_DEFAULT_MPP = 0.5  # TileSpec's target when neither mpp nor magnification is given (tiling.py)
_SHOW_IDS = 3  # example slide ids per group in messages


def _clean(value: Any) -> Any:
    """None for the ways a missing attribute is spelled in HDF5 (TRIDENT writes ``"None"``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "nan"):
        return None
    return value


def _number(value: Any) -> float | None:
    value = _clean(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN → None


@dataclass(frozen=True)
class BagSpec:
    """Provenance of one bag (None: not recorded in the file).

    Attributes:
        encoder: patch-encoder name (``features.attrs["encoder"]``, TRIDENT's ``name``).
        encoder_weights_sha256: SHA-256 of the encoder's weight file (None for weight-free ones).
        feature_dim: D of the ``features`` dataset.
        patch_size: output tile size in pixels (``coords.attrs["patch_size"]``).
        resolution: the requested tile resolution, ``"0.5 mpp"`` or ``"20x"``.
        target_mpp: the µm/px the tiles were actually cut at (varies slightly per scanner).
        target_magnification: the magnification the tiles were actually cut at.
    """

    encoder: str | None
    encoder_weights_sha256: str | None
    feature_dim: int
    patch_size: int | None
    resolution: str | None
    target_mpp: float | None
    target_magnification: float | None

    @property
    def key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in KEY_FIELDS)

    def describe(self) -> str:
        """``encoder=uni weights=3f2a9c1d patch_size=256 resolution=0.5 mpp`` (unrecorded shown)."""
        w = self.encoder_weights_sha256
        parts = [
            f"encoder={self.encoder or 'unrecorded'}",
            f"weights={w[:8] if w else 'unrecorded'}",
            f"patch_size={self.patch_size if self.patch_size is not None else 'unrecorded'}",
            f"resolution={self.resolution or 'unrecorded'}",
        ]
        return " ".join(parts)


def _resolution(header: BagHeader) -> str | None:
    raw = _clean(header.root_attrs.get("tile_spec"))
    if isinstance(raw, str):
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError:
            spec = None
        if isinstance(spec, dict):
            mag = _number(spec.get("magnification"))
            if mag is not None:
                return f"{mag:g}x"
            mpp = _number(spec.get("mpp"))
            return f"{_DEFAULT_MPP if mpp is None else mpp:g} mpp"
    mag = _number(header.coords_attrs.get("target_magnification"))  # TRIDENT
    return None if mag is None else f"{mag:g}x"


def bag_spec(header: BagHeader) -> BagSpec:
    """The ``BagSpec`` of a bag from its header (no feature data is read)."""
    fa, ca = header.features_attrs, header.coords_attrs
    encoder = _clean(fa.get("encoder")) or _clean(fa.get("name"))
    weights = _clean(fa.get("encoder_weights_sha256"))
    patch = _number(ca.get("patch_size"))
    return BagSpec(
        encoder=None if encoder is None else str(encoder),
        encoder_weights_sha256=None if weights is None else str(weights),
        feature_dim=int(header.dim),
        patch_size=None if patch is None else int(patch),
        resolution=_resolution(header),
        target_mpp=_number(ca.get("target_mpp")),
        target_magnification=_number(ca.get("target_magnification")),
    )


def group_specs(specs: Mapping[str, BagSpec]) -> list[tuple[BagSpec, list[str]]]:
    """Slides grouped by ``BagSpec.key``, largest group first: ``[(spec, slide_ids), ...]``."""
    groups: dict[tuple[Any, ...], tuple[BagSpec, list[str]]] = {}
    for sid, spec in specs.items():
        groups.setdefault(spec.key, (spec, []))[1].append(sid)
    return sorted(groups.values(), key=lambda g: -len(g[1]))


def describe_group(spec: BagSpec, ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOW_IDS]) + (", ..." if len(ids) > _SHOW_IDS else "")
    return f"[{spec.describe()}] {len(ids)} slide(s): {shown}"


def _range(values: list[float]) -> list[float] | None:
    return [round(min(values), 4), round(max(values), 4)] if values else None


def cohort_spec(specs: Mapping[str, BagSpec]) -> dict[str, Any]:
    """What run.json records about the cohort's bags (the largest group's spec + ranges).

    Keys: ``encoder``, ``encoder_weights_sha256``, ``feature_dim``, ``patch_size``,
    ``resolution``, ``target_mpp`` and ``target_magnification`` (``[min, max]`` over the
    cohort), ``groups`` (number of distinct specs, 1 unless mixing was allowed).
    """
    if not specs:
        return {}
    groups = group_specs(specs)
    main = groups[0][0]
    out = {k: v for k, v in asdict(main).items() if k not in ("target_mpp", "target_magnification")}
    out["target_mpp"] = _range([s.target_mpp for s in specs.values() if s.target_mpp is not None])
    out["target_magnification"] = _range(
        [s.target_magnification for s in specs.values() if s.target_magnification is not None]
    )
    out["groups"] = len(groups)
    return out


def spec_from_run(info: Mapping[str, Any]) -> BagSpec | None:
    """The run's bag spec from run.json (None for runs trained before it was recorded)."""
    raw = info.get("bag_spec")
    if not isinstance(raw, Mapping) or not raw:
        return None
    return BagSpec(
        encoder=raw.get("encoder"),
        encoder_weights_sha256=raw.get("encoder_weights_sha256"),
        feature_dim=int(raw.get("feature_dim") or 0),
        patch_size=raw.get("patch_size"),
        resolution=raw.get("resolution"),
        target_mpp=None,
        target_magnification=None,
    )


def check_against_run(
    run_spec: BagSpec | None,
    specs: Mapping[str, BagSpec],
    *,
    run_dir: Any,
    allow_mismatch: bool = False,
) -> list[str]:
    """Refuse bags whose encoder or tile spec differs from the run's (see the module rule).

    Returns the notes to print (the mismatch when ``allow_mismatch``, or that an old run has
    no recorded spec). Raises ``MilkitError`` listing each differing group with example ids.
    """
    if run_spec is None:
        return [
            "the run records no bag encoder/tile spec (trained by an older milkit); "
            "the bags' encoder was not checked"
        ]
    wrong = {sid: s for sid, s in specs.items() if s.key != run_spec.key}
    if not wrong:
        return []
    groups = "; ".join(describe_group(s, ids) for s, ids in group_specs(wrong))
    what = (
        f"{len(wrong)} bag(s) come from another encoder or tile spec than the run "
        f"[{run_spec.describe()}]: {groups}"
    )
    if allow_mismatch:
        return [what + " (--allow-encoder-mismatch: used anyway)"]
    raise MilkitError(
        what,
        path=run_dir,
        hint="Extract the bags with the run's encoder, weights and tile spec "
        "(milkit info BAG shows a bag's), or pass --allow-encoder-mismatch to use them anyway",
    )


__all__ = [
    "KEY_FIELDS",
    "BagSpec",
    "bag_spec",
    "check_against_run",
    "cohort_spec",
    "describe_group",
    "group_specs",
    "spec_from_run",
]
