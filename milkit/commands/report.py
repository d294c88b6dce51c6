"""``milkit report``: HTML + Markdown report of a training run (metrics, plots, heatmaps)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """example:
  milkit report --run runs/abmil                      # runs/abmil/report/index.html + report.md
  milkit report --run runs/abmil --slides slides/     # + heatmaps and top-8 tiles of 12 slides
  milkit report --run runs/abmil --slides slides/ --slide-ids S1 S7 --top-k 16 --out rep/

The report holds per-fold and pooled test metrics with 95% bootstrap CIs, the pooled ROC,
confusion matrix and calibration plot, and every out-of-fold prediction. With --slides it draws,
for misclassified and the most confident slides (or --slide-ids), the attention of the fold that
tested the slide on the slide's thumbnail, and cuts its top-k attended tiles from the slide.
The folder is self-contained (relative image links): move or zip it as it is.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="HTML + Markdown report of a training run",
        description="Write a report of a `milkit train` run: metrics with CIs, ROC, confusion "
        "matrix, calibration, predictions and (with --slides) heatmaps and top tiles.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (milkit train --out)")
    p.add_argument("--out", type=Path, help="report folder (default: RUN/report)")
    p.add_argument("--slides", type=Path, help="folder of the slides (adds heatmaps and tiles)")
    p.add_argument("--bags", type=Path, help="bags folder (default: the run's, from run.json)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--top-k", type=int, default=8, help="top attended tiles shown per slide (default 8)"
    )
    p.add_argument(
        "--max-slides", type=int, default=12, help="slides drawn with --slides (default 12)"
    )
    p.add_argument("--slide-ids", nargs="+", help="draw these slides instead")
    p.add_argument(
        "--device", default="auto", help="attention pass: auto, cpu, cuda (default auto)"
    )
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from milkit.errors import MilkitError
    from milkit.evaluation.run_report import build_run_report
    from milkit.io.bag_folders import bag_folder_for_cli

    for name in ("bootstrap", "top_k", "max_slides"):
        if getattr(args, name) < 0:
            raise MilkitError(f"--{name.replace('_', '-')} must be >= 0", value=getattr(args, name))
    if args.slides is not None and not args.slides.exists():
        raise MilkitError("slides folder not found", path=args.slides)
    if args.bags is not None:  # TRIDENT/CLAM trees too
        args.bags = bag_folder_for_cli(args.bags, "milkit report")
    report = build_run_report(
        args.run,
        args.out,
        slides_dir=args.slides,
        bags_dir=args.bags,
        bootstrap=args.bootstrap,
        seed=args.seed,
        top_k=args.top_k,
        max_slides=args.max_slides,
        slide_ids=args.slide_ids,
        device=args.device,
    )
    for note in report.notes:
        print(f"milkit report: note: {note}", file=sys.stderr)
    auc = report.pooled["auc"]
    print(f"pooled AUC {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]; wrote {report.index_html} "
          f"and {report.report_md} ({len(report.images)} images)")  # fmt: skip
    return 0
