"""``milkit info``: describe a slide (levels, mpp, magnification) or a bag (N, D, provenance)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  milkit info slides/CMU-1.svs            # vendor, pyramid levels, mpp, magnification
  milkit info bags/CMU-1.h5               # N x D, dtype, encoder, source, all attributes
  milkit info bags/CMU-1.h5 --json        # the same as JSON
  milkit info --encoders                  # patch encoders for `milkit preprocess --encoder`
"""

BAG_SUFFIXES = (".h5", ".hdf5", ".pt")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a slide or a bag file",
        description="Print what milkit sees in a whole-slide image or a bag (.h5 / .pt).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="?", type=Path, help="slide file/DICOM folder, or bag file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--encoders", action="store_true", help="list the patch encoders")
    p.set_defaults(func=run)


def _plain(value: Any) -> Any:
    """JSON-friendly copy (numpy arrays → lists, JSON strings left as they are).

    Floats are rounded to 12 significant digits (:func:`milkit.errors.tidy_floats`), so a
    target of 0.25 µm/px reads 0.25, not 0.24999999999999997.
    """
    import numpy as np

    from milkit.errors import tidy_floats

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return tidy_floats(value.tolist())
    if isinstance(value, (float, np.generic)):
        return tidy_floats(value)
    return value


def describe_bag(path: Path) -> dict[str, Any]:
    """N, D, dtype, encoder, source and every attribute of a bag."""
    from milkit.io.bags import read_bag_header

    h = read_bag_header(path)
    return _plain(
        {
            "kind": "bag",
            "path": str(path),
            "num_instances": h.num_instances,
            "dim": h.dim,
            "dtype": h.dtype,
            "encoder": h.features_attrs.get("encoder", h.features_attrs.get("name")),
            "source": h.source,
            "has_coords": h.has_coords,
            "features_attrs": h.features_attrs,
            "coords_attrs": h.coords_attrs,
            "root_attrs": h.root_attrs,
        }
    )


def describe_slide(path: Path) -> dict[str, Any]:
    """Vendor, reader, pyramid levels, mpp and magnification of a slide."""
    from milkit.errors import MilkitError
    from milkit.feature_extraction.slides import Slide

    with Slide(path) as s:
        info: dict[str, Any] = {
            "kind": "slide",
            "path": str(path),
            "slide_id": s.slide_id,
            "vendor": s.vendor,
            "backend": s.backend,
            "dimensions": list(s.dimensions),
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": float(ds)}
                for i, ((w, h), ds) in enumerate(
                    zip(s.level_dimensions, s.level_downsamples, strict=True)
                )
            ],
        }
        try:
            info["mpp"] = float(s.mpp)
            info["mpp_source"] = s.mpp_source
            info["magnification"] = float(s.magnification)
        except MilkitError as err:  # still worth describing: the user learns what to pass
            info["mpp"] = None
            info["magnification"] = None
            info["mpp_error"] = str(err)
        info["properties"] = dict(sorted(s.properties.items()))
    return _plain(info)


def describe_encoders() -> list[dict[str, Any]]:
    from milkit.feature_extraction.encoders import get_encoder_cfg, list_encoders

    rows = []
    for name in list_encoders():
        cfg = get_encoder_cfg(name)
        rows.append(
            {
                "name": name,
                "embed_dim": cfg.embed_dim,
                "input_size": cfg.input_size,
                "precision": cfg.precision,
                "weights": f"{cfg.hub_id}/{cfg.weights_file}" if cfg.weights_required else None,
                "license": cfg.license,
                "description": cfg.description,
            }
        )
    return rows


def _format_attrs(title: str, attrs: dict[str, Any]) -> list[str]:
    lines = [f"{title}:"] if attrs else [f"{title}: (none)"]
    for key in sorted(attrs):
        text = str(attrs[key])
        lines.append(f"  {key}: {text if len(text) <= 200 else text[:197] + '...'}")
    return lines


def format_bag(d: dict[str, Any]) -> str:
    n, dim = d["num_instances"], d["dim"]
    lines = [
        f"bag: {d['path']}",
        f"instances x dim: {n} x {dim}"
        + (f"  (empty: {d['root_attrs'].get('reason') or 'no tissue tiles'})" if n == 0 else ""),
        f"dtype: {d['dtype']}",
        f"encoder: {d['encoder'] or 'unknown'}",
        f"source: {d['source']}",
        f"coords: {'yes' if d['has_coords'] else 'no'}",
    ]
    lines += _format_attrs("root attributes", d["root_attrs"])
    lines += _format_attrs("features attributes", d["features_attrs"])
    lines += _format_attrs("coords attributes", d["coords_attrs"])
    return "\n".join(lines)


def format_slide(d: dict[str, Any]) -> str:
    w, h = d["dimensions"]
    lines = [
        f"slide: {d['path']}",
        f"slide id: {d['slide_id']}",
        f"vendor: {d['vendor']} (read with {d['backend']})",
        f"level 0: {w} x {h} px",
        f"levels: {len(d['levels'])}",
    ]
    for lv in d["levels"]:
        lines.append(
            f"  {lv['level']}: {lv['width']} x {lv['height']} px, downsample {lv['downsample']:.3f}"
        )
    if d["mpp"] is not None:
        lines.append(f"mpp: {d['mpp']:.4g} µm/px (from {d['mpp_source']})")
        lines.append(f"magnification: {d['magnification']:.3g}x")
    else:
        lines.append(f"mpp: unknown — {d['mpp_error']}")
    lines.append(f"properties: {len(d['properties'])} (use --json to see them)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from milkit.errors import MilkitError

    if args.encoders:
        rows = describe_encoders()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                weights = r["weights"] or "none needed"
                print(f"{r['name']:16s} {r['embed_dim']:5d}-d  {r['description']}  [{weights}]")
        return 0
    if args.path is None:
        raise MilkitError("give a slide or bag path (or --encoders)", hint="See milkit info -h")
    path: Path = args.path
    if not path.exists():
        raise MilkitError("path not found", path=path)
    is_bag = path.is_file() and path.suffix.lower() in BAG_SUFFIXES
    d = describe_bag(path) if is_bag else describe_slide(path)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        print(format_bag(d) if is_bag else format_slide(d))
    return 0
