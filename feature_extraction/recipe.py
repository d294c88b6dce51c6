"""The recipe of a bag: every setting that changes its bytes, recorded and compared on resume.

A rerun into the same ``--out`` skips a complete bag only when the bag was made with the same
recipe; otherwise the slide is refused with the differing settings named (old → new), so one
folder never silently mixes, say, 256-px tiles at 20× with 512-px tiles at 10×.

What is in it: the encoder, its weight file's SHA-256, the precision it actually ran at and the
runtime (``--runtime``: torch, onnxruntime, openvino); the
stored feature dtype; the tile spec (patch size, target mpp or magnification, overlap, min tissue);
the tissue-segmentation preset name and the resolved parameters *as a whole* (every field of the
parameter object, so fields added later are covered without touching this module); the level-0
mpp override used for the slide (``--slide-mpp`` / ``--mpp-csv``). Beyond those, every other field
of :class:`~milkit.feature_extraction.extract.ExtractConfig` is included by default; only the
options listed in :data:`RUNTIME_FIELDS` (how and where the run happens) are left out. A new
option therefore enters the recipe automatically and must be excluded deliberately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

RECIPE_VERSION = 1
# Options that change no byte of a bag, or that enter the recipe in resolved form (→ key).
RUNTIME_FIELDS = frozenset(
    {
        "batch_size",
        "num_workers",
        "device",
        "shard",
        "overwrite",
        "qc",
        "progress",
        "weights",  # → encoder_weights_sha256 (a moved file is the same recipe)
        "precision",  # → the precision the encoder resolved "auto" to
        "compile",  # torch.compile: same features (cosine ≥ 0.99999), see encoders.registry
        "slide_mpp",  # → slide_mpp: the override used for this slide
        "mpp_csv",
        "tissue_params",  # → tissue: the resolved parameters
        "pen_ink",  # → tissue.pen_ink (ExtractConfig.tissue() folds it into the parameters)
    }
)
# Command-line option behind each recipe key, for the refusal message.
FLAGS = {
    "encoder": "--encoder",
    "encoder_weights_sha256": "--weights",
    "precision": "--precision",
    "runtime": "--runtime",
    "dtype": "--float16",
    "patch_size": "--patch-size",
    "mpp": "--mpp",
    "magnification": "--magnification",
    "overlap": "--overlap",
    "min_tissue": "--min-tissue",
    "tissue_preset": "--tissue-preset",
    "tissue": "--tissue-preset",
    "pen_ink": "--pen-ink / --no-pen-filter",
    "tissue.pen_ink": "--pen-ink / --no-pen-filter",
    "slide_mpp": "--slide-mpp / --mpp-csv",
}


def _plain(value: Any) -> Any:
    """JSON round trip: tuples → lists, paths → str, exactly as the recipe reads back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def build_recipe(
    config: Any,
    *,
    weights_sha256: str | None,
    precision: str,
    slide_mpp: float | None,
) -> dict[str, Any]:
    """The recipe of one slide's bag (a JSON-able dict; see the module docstring).

    Args:
        config: the run's ``ExtractConfig`` (any dataclass with its fields).
        weights_sha256: SHA-256 of the encoder's weight file (None: weight-free encoder).
        precision: the autocast precision the encoder runs at (``auto`` already resolved).
        slide_mpp: level-0 µm/px override used for this slide, None when read from the file.
    """
    from milkit.feature_extraction.tiling import DEFAULT_MPP

    recipe: dict[str, Any] = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in RUNTIME_FIELDS
    }
    if recipe.get("mpp") is None and recipe.get("magnification") is None:
        recipe["mpp"] = DEFAULT_MPP  # no target given means 0.5 µm/px: the same recipe
    tissue = config.tissue()
    recipe["tissue"] = dataclasses.asdict(tissue) if dataclasses.is_dataclass(tissue) else tissue
    if getattr(config, "tissue_params", None) is not None:
        recipe["tissue_preset"] = "custom"
    recipe["encoder_weights_sha256"] = weights_sha256
    recipe["precision"] = precision
    recipe["slide_mpp"] = slide_mpp
    recipe["recipe_version"] = RECIPE_VERSION
    return _plain(recipe)


def legacy_recipe(features_attrs: Mapping[str, Any], root_attrs: Mapping[str, Any]) -> dict:
    """What a milkit bag written before recipes existed recorded of its recipe."""
    from milkit.feature_extraction.tiling import DEFAULT_MPP

    recipe: dict[str, Any] = {}
    if "tile_spec" in root_attrs:
        recipe.update(json.loads(str(root_attrs["tile_spec"])))
        if recipe.get("mpp") is None and recipe.get("magnification") is None:
            recipe["mpp"] = DEFAULT_MPP
    if "tissue_params" in root_attrs:
        recipe["tissue"] = json.loads(str(root_attrs["tissue_params"]))
    if "encoder" in features_attrs:
        recipe["encoder"] = features_attrs["encoder"]
    sha = features_attrs.get("encoder_weights_sha256")
    recipe["encoder_weights_sha256"] = None if sha in (None, "None") else sha
    if "precision" in features_attrs:
        recipe["precision"] = features_attrs["precision"]
    recipe["runtime"] = str(features_attrs.get("encoder_runtime", "torch"))  # only torch existed
    if "storage_dtype" in features_attrs:
        recipe["dtype"] = features_attrs["storage_dtype"]
    return _plain(recipe)


def _upgrade_tissue(recipe: dict[str, Any]) -> dict[str, Any]:
    """Read recorded tissue parameters the way the tissue module upgrades old ones.

    ``TissueParams.from_dict`` fills parameters added after the bag was made with the value
    that reproduces how it was made (e.g. no pen-ink filter for bags older than the filter).
    Parameters it does not know (a custom subclass) are compared as recorded.
    """
    from milkit.errors import MilkitError
    from milkit.feature_extraction.tissue import TissueParams

    if isinstance(recipe.get("tissue"), Mapping):
        with contextlib.suppress(MilkitError, TypeError, ValueError):
            recipe["tissue"] = _plain(TissueParams.from_dict(dict(recipe["tissue"])).to_dict())
    return recipe


def bag_recipe(header: Any) -> tuple[dict[str, Any], bool]:
    """(recipe, legacy) of a bag header: the recorded recipe, else one rebuilt from its attrs.

    ``legacy`` is True for bags written before the recipe attribute existed.
    """
    text = header.root_attrs.get("recipe")
    if text not in (None, "None"):
        recipe = json.loads(str(text))
        recipe.setdefault("runtime", "torch")  # recorded before --runtime existed: torch
        return _upgrade_tissue(recipe), False
    return _upgrade_tissue(legacy_recipe(header.features_attrs, header.root_attrs)), True


def _flatten(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_MISSING = object()


def recipe_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], *, legacy: bool = False
) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` for every setting that differs, sorted by key.

    Nested settings are named with dots (``tissue.otsu_floor``). A key only one side has counts
    as a difference (its value is shown as ``(not recorded)``), except that for a ``legacy``
    bag (written before recipes were recorded) only what it did record is compared.
    """
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if legacy and key not in a:
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def show_value(value: Any) -> str:
    """A recipe value for people: short floats, quoted strings, ``(none)`` for None."""
    if value is _MISSING:
        return "(not recorded)"
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.12g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 20 else value[:12] + "…")
    return json.dumps(value)


def format_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    """``"patch_size 256 → 512 (--patch-size), ..."`` for a refusal message."""
    parts = []
    for key, old, new in diffs:
        flag = FLAGS.get(key, FLAGS.get(key.split(".")[0]))
        text = f"{key} {show_value(old)} → {show_value(new)}"
        parts.append(f"{text} ({flag})" if flag else text)
    return ", ".join(parts)


__all__ = [
    "RECIPE_VERSION",
    "RUNTIME_FIELDS",
    "bag_recipe",
    "build_recipe",
    "format_differences",
    "legacy_recipe",
    "recipe_differences",
    "show_value",
]
