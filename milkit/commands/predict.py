"""``milkit predict``: class probabilities for new bags with a trained run (one fold or ensemble)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv             # mean of all folds
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv --fold 2
  milkit predict --run runs/abmil --bags new_bags/ --out preds.csv --labels new_labels.csv

Writes slide_id, pred, prob_<class>... (and label when --labels is given, plus metrics on
stderr). --fold all averages the class probabilities of every fold's selected checkpoint.
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
    p.add_argument("--bags", required=True, type=Path, help="folder of <slide_id>.h5 bags")
    p.add_argument("--out", required=True, type=Path, help="predictions CSV to write")
    p.add_argument("--fold", default="all", help="fold number, or 'all' for the ensemble mean")
    p.add_argument("--labels", type=Path, help="optional labels CSV: adds labels and metrics")
    p.add_argument("--batch-size", type=int, default=1, help="bags per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.set_defaults(func=run_command)


def predict_run(run_dir: Path, dataset, *, fold: str = "all", batch_size: int = 1,
                device: str = "auto"):  # fmt: skip
    """Ensemble-mean ``Predictions`` of the selected fold checkpoints of a run."""
    import numpy as np

    from milkit.checkpoint import load_checkpoint
    from milkit.cv import fold_checkpoints, load_run
    from milkit.train import predict, resolve_device

    load_run(run_dir)
    dev = resolve_device(device)
    probs, first = [], None
    for ckpt in fold_checkpoints(run_dir, fold):
        model, _ = load_checkpoint(ckpt, map_location=dev)
        out = predict(model, dataset, batch_size=batch_size, device=dev)
        probs.append(out.probs)
        first = first or out
    first.probs = np.mean(probs, axis=0)
    return first


def run_command(args: argparse.Namespace) -> int:
    import sys

    from milkit.atomic import atomic_path
    from milkit.bags import list_bags, read_bag_header
    from milkit.cv import load_run
    from milkit.data import BagDataset, load_labels
    from milkit.errors import MilkitError

    info = load_run(args.run)
    names = [str(c) for c in info["class_names"]]
    if args.labels is not None:
        table = load_labels(args.labels, args.bags, class_names=names)
        dataset = BagDataset.from_table(table)
    else:
        if not args.bags.is_dir():
            raise MilkitError("bags folder not found", path=args.bags)
        bags = list_bags(args.bags)
        if not bags:
            raise MilkitError("no bags found", path=args.bags, hint="Expected <slide_id>.h5 files")
        dataset = BagDataset(list(bags.values()), slide_ids=list(bags))
    wrong, empty = [], []
    for sid, path in zip(dataset.slide_ids, dataset.paths):
        header = read_bag_header(path)
        if header.dim != info["in_dim"]:
            wrong.append(f"{sid} ({header.dim})")
        elif header.num_instances == 0:
            empty.append(sid)
    if wrong:
        raise MilkitError(
            f"feature dimension differs from the run's in_dim {info['in_dim']}",
            value=wrong[:5],
            path=args.bags,
            hint="Extract the bags with the encoder used for training",
        )
    if empty:  # slides without tissue: recorded and skipped, the others are still predicted
        keep = [i for i, sid in enumerate(dataset.slide_ids) if sid not in set(empty)]
        if not keep:
            raise MilkitError("every bag is empty (no tiles)", value=empty[:5], path=args.bags)
        dataset = BagDataset([dataset.paths[i] for i in keep],
                             slide_ids=[dataset.slide_ids[i] for i in keep])  # fmt: skip
    preds = predict_run(args.run, dataset, fold=args.fold, batch_size=args.batch_size,
                        device=args.device)  # fmt: skip
    frame = preds.to_frame(names)
    if args.labels is None:
        frame = frame.drop(columns=["label"])
    with atomic_path(args.out) as tmp:
        frame.to_csv(tmp, index=False)
    print(f"wrote {len(frame)} predictions to {args.out}", file=sys.stderr)
    if empty:
        print(f"skipped {len(empty)} empty bag(s): {', '.join(empty[:10])}", file=sys.stderr)
    if args.labels is not None:
        from milkit.metrics import classification_metrics

        m = classification_metrics(preds.labels, preds.probs, names)
        print(f"auc {m['auc']:.3f}  accuracy {m['accuracy']:.3f}  "
              f"balanced_accuracy {m['balanced_accuracy']:.3f}  n {m['n']}")  # fmt: skip
    return 1 if empty else 0
