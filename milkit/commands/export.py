"""``milkit export``: write bags in CLAM's or TRIDENT's folder layout (links where possible)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """example:
  milkit export --to clam bags/ clam_feats/                # clam_feats/{pt_files,h5_files}/
  milkit export --to clam bags/ clam_feats/ --splits runs/abmil/splits.csv
  milkit export --to trident bags/ trident_job/            # trident_job/20x_256px_0px_overlap/...
  milkit export --to trident bags/ job/ --encoder uni_v1 --copy

CLAM: pt_files/<slide>.pt is what CLAM's training reads (a float32 (N, D) tensor, always
written); h5_files/<slide>.h5 (features + coords, for CLAM's heatmaps/clustering) links the bag
when it is float32, else holds a float32 copy. --splits also writes CLAM's splits_<k>.csv files
(train,val,test columns) to OUT/splits/.
TRIDENT: OUT/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5 links the bag
(milkit bags carry TRIDENT's coords attributes) and patches/<slide>_patches.h5 holds the coords.
Links are hard links (symbolic links across filesystems); --copy copies instead. Every file is
written atomically; a slide that fails is reported at the end and the others are exported
(exit status 1 if any failed).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write bags as CLAM's pt_files/h5_files or a TRIDENT job tree",
        description="Export a folder of bags to the layout CLAM or TRIDENT reads unchanged.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--to", required=True, choices=("clam", "trident"), help="target layout")
    p.add_argument("bags", type=Path, help="folder of bags (<slide_id>.h5/.hdf5/.pt), or a "
                   "TRIDENT job/tiling folder or CLAM feature folder holding one")  # fmt: skip
    p.add_argument("out", type=Path, help="CLAM data_dir, or TRIDENT job folder")
    p.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    p.add_argument(
        "--encoder", help="TRIDENT: encoder name for features_<name>/ (default: from the bags)"
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="CLAM: also write OUT/splits/splits_<k>.csv from this milkit split file",
    )
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from milkit.data.splits import load_splits
    from milkit.errors import MilkitError
    from milkit.interop.export import export_bags, write_clam_splits
    from milkit.io.bag_folders import bag_folder_for_cli

    if args.splits is not None and args.to != "clam":
        raise MilkitError("--splits applies to --to clam only", value=args.to)
    if args.encoder is not None and args.to != "trident":
        raise MilkitError("--encoder applies to --to trident only", value=args.to)
    splits = load_splits(args.splits) if args.splits is not None else None  # fail early
    args.bags = bag_folder_for_cli(args.bags, "milkit export", flag="")  # TRIDENT/CLAM trees too
    result = export_bags(args.bags, args.out, args.to, copy=args.copy, encoder=args.encoder)
    if splits is not None:
        files = write_clam_splits(splits, args.out / "splits")
        print(f"milkit export: {len(files)} CLAM split file(s) in {args.out / 'splits'}")
    n_ok = len(set(result.linked) | set(result.written))
    n_linked = sum(len(v) for v in result.linked.values())
    n_written = sum(len(v) for v in result.written.values())
    folders = ", ".join(str(p) for p in sorted(result.folders)) or str(args.out)
    print(
        f"milkit export: {n_ok} slide(s) to {args.to} layout in {folders} "
        f"({n_linked} file(s) linked, {n_written} written)"
    )
    for note in result.notes:
        print(f"milkit export: note: {note}", file=sys.stderr)
    if result.failed:
        print(f"milkit export: {len(result.failed)} slide(s) failed:", file=sys.stderr)
        for slide_id, reason in sorted(result.failed.items()):
            print(f"  {slide_id}: {reason}", file=sys.stderr)
        return 1
    return 0
