"""``milkit heatmap``: a trained model's attention drawn back onto the slide thumbnail."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit heatmap --run runs/abmil --slide slides/S1.svs --bag bags/S1.h5 --out S1_attention.png
  milkit heatmap --run runs/abmil --bag bags/S1.h5 --out S1.png --fold 2 --normalize rank
  milkit heatmap --run runs/abmil --slide slides/S1.svs --bag bags/S1.h5 --out S1.png \
      --scores S1_attention.csv --top-k 8            # + per-tile scores and the 8 top tiles

Without --slide the scores are drawn on a blank canvas of the slide's shape. --fold all (the
default) averages the attention of every fold's model; multi-head attention is averaged over
heads. The title shows the predicted class probability. --scores writes the same per-tile
scores (slide_id, tile, x, y, score, rank; level-0 coords) as CSV, or HDF5 for a .h5 name;
--top-k K cuts the K highest-scoring tiles out of the slide (needs --slide) into
<out stem>_top_tiles/<slide>_top<rank>.png.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "heatmap",
        help="attention heatmap of a slide with a trained run",
        description="Draw a trained aggregator's attention over a slide's thumbnail (PNG).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (milkit train --out)")
    p.add_argument("--bag", required=True, type=Path, help="the slide's bag (.h5)")
    p.add_argument("--slide", type=Path, help="the slide file (for the thumbnail)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--fold", default="all", help="fold number, or 'all' (mean over folds)")
    p.add_argument("--normalize", default="minmax", choices=("minmax", "rank", "none"),
                   help="score scaling (default minmax; rank = CLAM's percentile)")  # fmt: skip
    p.add_argument("--cmap", default="jet", help="matplotlib colour map (default jet)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--allow-slide-mismatch", action="store_true",
                   help="draw on a slide whose id or file content differs from the bag's "
                   "record (a renamed or re-saved copy); the level-0 size must still match")  # fmt: skip
    p.add_argument("--scores", type=Path,
                   help="also write the per-tile scores (.csv, or .h5 for HDF5)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also save the K highest-scoring tiles as PNGs (needs --slide)")  # fmt: skip
    p.add_argument("--allow-encoder-mismatch", action="store_true",
                   help="draw a bag from another encoder/tile spec than the run's")  # fmt: skip
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import sys

    from milkit.errors import MilkitError
    from milkit.evaluation.heatmap import heatmap_for_slide
    from milkit.training.inference import attention_scores

    if args.slide is not None and not args.slide.exists():
        raise MilkitError("slide file not found", path=args.slide)
    if args.top_k < 0 or (args.top_k and args.slide is None):
        raise MilkitError("--top-k K cuts tiles out of the slide: pass --slide and K >= 1",
                          value=args.top_k)  # fmt: skip
    if args.slide is not None:  # before any model runs: is this the bag's slide?
        from milkit.evaluation.heatmap import check_slide_matches_bag
        from milkit.feature_extraction.slides import Slide

        with Slide(args.slide) as slide:
            dims = tuple(int(v) for v in slide.dimensions)
        check_slide_matches_bag(args.bag, args.slide, dims,
                                allow_mismatch=args.allow_slide_mismatch)  # fmt: skip
    scores, probs, names = attention_scores(args.run, args.bag, fold=args.fold,
                                            device=args.device,
                                            allow_encoder_mismatch=args.allow_encoder_mismatch)  # fmt: skip
    k = int(probs.argmax())
    title = f"{args.bag.stem}: {names[k]} (p={probs[k]:.2f}), attention fold {args.fold}"
    notes: list[str] = []
    heatmap_for_slide(args.slide, args.bag, scores, args.out, title=title, cmap=args.cmap,
                      allow_slide_mismatch=args.allow_slide_mismatch, notes=notes,
                      alpha=args.alpha, normalize=args.normalize, label="attention")  # fmt: skip
    for note in notes:
        print(f"milkit heatmap: note: {note}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.scores is not None or args.top_k:
        from milkit.evaluation.attention_export import save_top_tiles, write_tile_scores
        from milkit.io.bags import read_bag_coords, slide_id_from_path

        sid = slide_id_from_path(args.bag)
        if args.scores is not None:
            coords, _ = read_bag_coords(args.bag)
            write_tile_scores(args.scores, sid, coords, scores,
                              {"kind": "attention", "run": str(args.run), "fold": str(args.fold),
                               "predicted": names[k]})  # fmt: skip
            print(f"wrote {args.scores}", file=sys.stderr)
        if args.top_k:
            folder = args.out.parent / f"{args.out.stem}_top_tiles"
            tiles = save_top_tiles(args.slide, args.bag, scores, args.top_k, folder, sid)
            print(f"wrote {len(tiles)} top tiles to {folder}", file=sys.stderr)
    return 0
