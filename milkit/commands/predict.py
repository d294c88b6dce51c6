"""``milkit predict``: class probabilities for new bags with a trained run (one fold or ensemble)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv             # mean of all folds
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv --fold 2
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv --labels new_labels.csv
  milkit predict --run runs/abmil --bags huge_bags/ --out preds.csv --max-instances 20000
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv --attention attention/

Writes slide_id, pred, prob_<class>... (and label when --labels is given, plus metrics on
stderr). --fold all averages the class probabilities of every fold's selected checkpoint.
Bags must come from the run's encoder, weights and tile spec (run.json "bag_spec"); others are
refused unless --allow-encoder-mismatch.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict new bags with a trained run",
        description="Predict slide labels for a folder of bags with a `milkit train` run.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (milkit train --out)")
    p.add_argument("--bags", required=True, type=Path,
                   help="folder of <slide_id>.h5/.pt bags, or a TRIDENT job/tiling folder or CLAM "
                   "feature folder holding one")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="predictions CSV to write")
    p.add_argument("--fold", default="all", help="fold number, or 'all' for the ensemble mean")
    p.add_argument("--labels", type=Path, help="optional labels CSV: adds labels and metrics")
    p.add_argument("--label-column", default="label", help="label column of --labels")
    p.add_argument("--slide-column", default="slide_id", help="slide-id column of --labels")
    p.add_argument("--case-column", help="case column of --labels (default case_id if present)")
    p.add_argument("--allow-encoder-mismatch", action="store_true",
                   help="predict bags from another encoder/tile spec than the run's")  # fmt: skip
    p.add_argument("--max-instances", type=int,
                   help="keep N evenly spaced instances of larger bags (to fit memory; "
                   "default: whole bags)")  # fmt: skip
    p.add_argument("--attention", type=Path, metavar="DIR",
                   help="also write each slide's per-tile attention (fold-ensembled, level-0 "
                   "coords) to DIR/<slide_id>.csv (or .h5 with --attention-format h5)")  # fmt: skip
    p.add_argument("--attention-format", choices=("csv", "h5"), default="csv",
                   help="file format of --attention (default csv)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1, help="bags per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import sys

    from milkit.data.datasets import BagDataset
    from milkit.data.labels import load_labels
    from milkit.data.provenance import bag_spec, check_against_run, spec_from_run
    from milkit.errors import MilkitError
    from milkit.io.atomic import atomic_path
    from milkit.io.bag_folders import bag_folder_for_cli
    from milkit.io.bags import list_bags, read_bag_header
    from milkit.io.runs import load_run
    from milkit.training.inference import check_bags_for_run, predict_run

    if args.attention is not None and args.max_instances is not None:
        raise MilkitError(
            "--attention needs every tile's score, --max-instances predicts from a subset",
            hint="Drop --max-instances (or predict twice: capped for probabilities, uncapped "
            "with --attention for the slides that fit)",
        )
    args.bags = bag_folder_for_cli(args.bags, "milkit predict")  # TRIDENT/CLAM trees too
    info = load_run(args.run)
    names = [str(c) for c in info["class_names"]]
    if args.labels is not None:
        table = load_labels(args.labels, args.bags, class_names=names,
                            label_column=args.label_column, slide_column=args.slide_column,
                            case_column=args.case_column, check_bag_specs=False)  # fmt: skip
        for note in table.notes:
            print(f"milkit predict: note: {note}", file=sys.stderr)
        dataset = BagDataset.from_table(table, eval_max_instances=args.max_instances)
    else:
        if not args.bags.is_dir():
            raise MilkitError("bags folder not found", path=args.bags)
        bags = list_bags(args.bags)
        if not bags:
            raise MilkitError("no bags found", path=args.bags, hint="Expected <slide_id>.h5 files")
        dataset = BagDataset(list(bags.values()), slide_ids=list(bags),
                             eval_max_instances=args.max_instances)  # fmt: skip
    headers = {sid: read_bag_header(p) for sid, p in zip(dataset.slide_ids, dataset.paths)}
    empty = check_bags_for_run(info, headers, where=args.bags)  # shared with milkit heatmap
    specs = {sid: bag_spec(header) for sid, header in headers.items()}
    capped = [f"{sid} (N={h.num_instances:,})" for sid, h in headers.items()
              if args.max_instances is not None and h.num_instances > args.max_instances]  # fmt: skip
    # the encoder check: same-width features from another encoder are silently wrong
    for note in check_against_run(spec_from_run(info), specs, run_dir=args.run,
                                  allow_mismatch=args.allow_encoder_mismatch):  # fmt: skip
        print(f"milkit predict: note: {note}", file=sys.stderr)
    if capped:
        print(f"milkit predict: note: {len(capped)} bag(s) larger than --max-instances "
              f"{args.max_instances} were predicted from that many evenly spaced instances: "
              + ", ".join(capped[:10]), file=sys.stderr)  # fmt: skip
    if empty:  # slides without tissue: recorded and skipped, the others are still predicted
        keep = [i for i, sid in enumerate(dataset.slide_ids) if sid not in set(empty)]
        if not keep:
            raise MilkitError("every bag is empty (no tiles)", value=empty[:5], path=args.bags)
        dataset = BagDataset([dataset.paths[i] for i in keep],
                             slide_ids=[dataset.slide_ids[i] for i in keep],
                             eval_max_instances=args.max_instances)  # fmt: skip
    preds = predict_run(args.run, dataset, fold=args.fold, batch_size=args.batch_size,
                        device=args.device, with_attention=args.attention is not None)  # fmt: skip
    if args.attention is not None:
        from milkit.evaluation.attention_export import write_tile_scores
        from milkit.io.bags import read_bag_coords

        for sid, path, att in zip(preds.slide_ids, dataset.paths, preds.attention, strict=True):
            coords, _ = read_bag_coords(path)
            write_tile_scores(args.attention / f"{sid}.{args.attention_format}", sid, coords, att,
                              {"kind": "attention", "run": str(args.run), "fold": str(args.fold)})  # fmt: skip
        print(f"wrote per-tile attention of {len(preds.slide_ids)} slide(s) to {args.attention}",
              file=sys.stderr)  # fmt: skip
    frame = preds.to_frame(names)
    if args.labels is None:
        frame = frame.drop(columns=["label"])
    with atomic_path(args.out) as tmp:
        frame.to_csv(tmp, index=False)
    print(f"wrote {len(frame)} predictions to {args.out}", file=sys.stderr)
    if empty:
        print(f"skipped {len(empty)} empty bag(s): {', '.join(empty[:10])}", file=sys.stderr)
    if args.labels is not None:
        from milkit.training.metrics import classification_metrics

        m = classification_metrics(preds.labels, preds.probs, names)
        print(f"auc {m['auc']:.3f}  accuracy {m['accuracy']:.3f}  "
              f"balanced_accuracy {m['balanced_accuracy']:.3f}  n {m['n']}")  # fmt: skip
    return 1 if empty else 0
