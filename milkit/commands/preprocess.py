"""``milkit preprocess``: slides → one HDF5 bag per slide (segment, tile, encode, write)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """example:
  milkit preprocess slides/ --out bags/ --encoder resnet50-trunc --mpp 0.5 --patch-size 256
  milkit preprocess a.svs b.ndpi --out bags/ --encoder uni --weights ~/uni/pytorch_model.bin
  milkit preprocess slides/ --out bags/ --encoder fast --shard 1/4      # one of 4 machines
  torchrun --nproc-per-node 4 -m milkit preprocess slides/ --out bags/  # one slide set per GPU

Writes bags/<slide_id>.h5, bags/qc/<slide_id>.png and bags/manifest.csv (one row per slide:
status ok / empty (no tile: too small, bare glass, too little tissue; the reason is given) /
failed, tile counts, timings, error, reason, recipe). Rerunning resumes: a complete bag made
with the same settings (encoder + weights, precision, tile size, resolution, overlap,
min-tissue, tissue preset and parameters, slide mpp, dtype) is skipped; one made with other
settings is refused, naming them (use --overwrite or another --out). Exit status 1 if any slide
failed (the others are still processed).
"""


def _encoder_names() -> list[str]:
    from milkit.feature_extraction.encoders import list_encoders

    return list_encoders()


def _tissue_presets() -> list[str]:
    from milkit.feature_extraction.tissue import PRESETS

    return list(PRESETS)


# Options whose valid values live in a registry: listed in --help, computed only when help is
# printed (importing torch / OpenCV for every `milkit` call would make the CLI slow).
_LISTED_CHOICES = {"encoder": _encoder_names, "tissue_preset": _tissue_presets}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(one of: a, b, c)" to the help of the options in ``_LISTED_CHOICES``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        names = _LISTED_CHOICES.get(action.dest)
        return f"{text} (one of: {', '.join(names())})" if names else text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="segment, tile and encode slides into bags",
        description='Turn whole-slide images into HDF5 bags of patch features (format: README, "The bag format").',
        epilog=EXAMPLE,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("slides", nargs="+", help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder for bags")
    enc = p.add_argument_group("encoder")
    enc.add_argument(
        "--encoder",
        default="fast",
        metavar="NAME",
        help="patch encoder (default: fast; details: milkit info --encoders)",
    )
    enc.add_argument("--weights", type=Path, help="encoder weight file (default: HF cache)")
    enc.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default 64)")
    enc.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tile-reader processes (default: 2, or none where the encoder runs on CPU on every "
        "core: readers would only take its cores)",
    )
    enc.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    enc.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16", "int8"),
        help="autocast precision (auto: the encoder's declared one; fp32 encoders such as "
        "resnet50-trunc stay fp32; half-precision ones run bf16 on CPUs with native bf16); int8: "
        "with --runtime onnxruntime, quantised on fixed synthetic tiles",
    )
    enc.add_argument(
        "--runtime",
        default="torch",
        choices=("torch", "onnxruntime", "openvino"),
        help="opt-in CPU fast path (pip install 'milkit[fast-cpu]'): onnxruntime (fp32) or "
        "openvino (fp32; bf16 with --precision bf16 on CPUs with native bf16); features within "
        "cosine 0.999 of torch fp32; recorded in the bag (default torch)",
    )
    enc.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="how the torch runtime runs on CPU in fp32 (same features): auto (default): "
        "resnet50-trunc oneDNN-fused at once, other encoders torch.compile'd once the run "
        "reaches 2,000 tiles; on: torch.compile; off: eager",
    )
    enc.add_argument("--float16", action="store_true", help="store features as float16")
    tiles = p.add_argument_group("tiles")
    res = tiles.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=float, help="target µm/px (default 0.5, i.e. 20x)")
    res.add_argument("--magnification", type=float, help="target magnification, e.g. 20")
    tiles.add_argument("--patch-size", type=int, default=256, help="tile side in px (default 256)")
    tiles.add_argument("--overlap", type=int, default=0, help="tile overlap in px (default 0)")
    tiles.add_argument(
        "--min-tissue", type=float, default=0.25, help="min tissue fraction per tile (0.25)"
    )
    tiles.add_argument(
        "--tissue-preset",
        default="default",
        metavar="NAME",
        help="tissue-segmentation preset (default: default)",
    )
    pen = tiles.add_mutually_exclusive_group()
    pen.add_argument(
        "--pen-ink",
        metavar="COLOURS",
        help="marker inks removed from the tissue: comma-separated blue, green, black, red, or "
        "none (default blue,green,black; red also matches blood, so it is opt-in)",
    )
    pen.add_argument(
        "--no-pen-filter", action="store_true", help="keep marker ink (same as --pen-ink none)"
    )
    mpp = tiles.add_mutually_exclusive_group()
    mpp.add_argument("--slide-mpp", type=float, help="level-0 µm/px of every slide (override)")
    mpp.add_argument("--mpp-csv", type=Path, help="CSV with slide_id,mpp per slide")
    run = p.add_argument_group("run")
    run.add_argument("--shard", help="i/n: process the i-th of n slide shards")
    run.add_argument("--overwrite", action="store_true", help="redo slides with complete bags")
    run.add_argument("--no-qc", action="store_true", help="skip QC thumbnails")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_command)


def config_from_args(args: argparse.Namespace):  # -> ExtractConfig
    """The :class:`ExtractConfig` equal to the parsed command line."""
    from milkit.feature_extraction.batch import parse_shard
    from milkit.feature_extraction.extract import ExtractConfig

    return ExtractConfig(
        encoder=args.encoder,
        weights=args.weights,
        patch_size=args.patch_size,
        mpp=args.mpp,
        magnification=args.magnification,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
        tissue_preset=args.tissue_preset,
        pen_ink=_pen_ink(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        compile=args.compile,
        dtype="float16" if args.float16 else "float32",
        shard=parse_shard(args.shard) if args.shard else None,
        slide_mpp=args.slide_mpp,
        mpp_csv=args.mpp_csv,
        overwrite=args.overwrite,
        qc=not args.no_qc,
        progress=not args.no_progress,
    )


def _pen_ink(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--no-pen-filter / --pen-ink COLOURS → the ExtractConfig value (None: the preset's)."""
    from milkit.feature_extraction.tissue import parse_pen_ink

    if getattr(args, "no_pen_filter", False):
        return ()
    text = getattr(args, "pen_ink", None)
    return None if text is None else parse_pen_ink(text)


def run_command(args: argparse.Namespace) -> int:
    from milkit.feature_extraction.extract import preprocess

    summary = preprocess(args.slides, args.out, config_from_args(args))
    print(summary.format(), file=sys.stderr if summary.exit_code else sys.stdout)
    return summary.exit_code


run = run_command
