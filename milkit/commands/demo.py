"""``milkit demo``: synthetic cohort → bags → cross-validated model → checks → HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit demo --out demo_output                  # ~24 slides, ABMIL, 3 folds, a few minutes
  milkit demo --out demo_tiny --slides 8 --folds 2 --epochs 5 --no-check
  milkit demo --out demo_output --model transmil  # another aggregator (milkit models)

Writes OUT/slides (synthetic slides with planted tumour + labels.csv), OUT/bags (features, QC,
manifest), OUT/run (cross-validation), OUT/check (MIL assumption checks) and OUT/report/index.html.
Rerunning into the same folder reuses finished stages; --overwrite starts again. Everything runs
offline on a CPU.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from milkit.demo.pipeline import DEFAULT_EPOCHS, DEFAULT_SIZE, DEFAULT_SLIDES

    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo on synthetic slides (offline, minutes on a CPU)",
        description="Generate a synthetic cohort, preprocess it, cross-validate a MIL model, run "
        "the MIL assumption checks and write an HTML report.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="demo folder (default demo_output)"
    )
    p.add_argument(
        "--slides",
        type=int,
        default=DEFAULT_SLIDES,
        help=f"synthetic slides, half with tumour (default {DEFAULT_SLIDES})",
    )
    p.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"slide side in level-0 px at 0.5 µm/px (default {DEFAULT_SIZE})",
    )
    p.add_argument("--model", default="abmil", help="registered aggregator (default abmil)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"max epochs per fold, early stopping (default {DEFAULT_EPOCHS})",
    )
    p.add_argument("--encoder", default="fast", help="patch encoder (default fast: no weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of cohort, splits and training")
    p.add_argument(
        "--max-instances", type=int, help="subsample training bags to N tiles (lowers memory)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small bags)")
    p.add_argument("--no-check", action="store_true", help="skip the MIL assumption checks")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the demo's stage folders in --out and start again",
    )
    p.add_argument("--no-progress", action="store_true", help="no stage messages or bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from milkit.demo.pipeline import run_demo

    result = run_demo(
        args.out,
        n_slides=args.slides,
        slide_size=args.size,
        model=args.model,
        folds=args.folds,
        epochs=args.epochs,
        encoder=args.encoder,
        seed=args.seed,
        check=not args.no_check,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        max_instances=args.max_instances,
        threads=args.threads,
    )
    print(result.format())
    return 0
