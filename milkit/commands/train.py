"""``milkit train``: cross-validate an aggregator on a bags folder + labels CSV."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  milkit train --bags bags/ --labels labels.csv --model abmil --folds 5 --out runs/abmil
  milkit train --bags bags/ --labels labels.csv --model transmil --preset official \\
               --out runs/transmil --model-arg dropout=0.1 --balanced
  milkit train ... --out runs/abmil --resume            # continue a killed run
  torchrun --nproc-per-node 4 -m milkit train ...        # data-parallel (DDP)
  milkit train ... --slide-column slide --label-column diagnosis --skip-missing
  milkit train ... --max-instances 20000 --eval-max-instances 20000   # huge bags

labels.csv: slide_id,label[,case_id][,split]. Bags are found as BAGS/<slide_id>.h5. Folds are
stratified and grouped by case_id; a 'split' column (train/val/test) gives one fixed split
instead. Writes RUN/run.json, splits.csv, fold_<k>/{best.pt,last.pt,log.csv,predictions.csv,
metrics.json,roc.png}, summary.json and summary.csv (mean ± std over folds). run.json records
the bags' encoder and tile spec (bag_spec); a cohort mixing encoders is refused.
"""


NO_PATIENCE = "none: every epoch runs and the best one is kept"


def _default(name: str, none: str = "none") -> str:
    """``default X`` for a TrainConfig field: milkit's default preset (imports no torch)."""
    from dataclasses import fields

    from milkit.training.config import TrainConfig

    value = {f.name: f.default for f in fields(TrainConfig)}[name]
    shown = none if value is None else f"{value:g}" if isinstance(value, float) else value
    return f"default {shown}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train and cross-validate an aggregator on bags",
        description="Cross-validate a MIL aggregator (leak-free: early stopping on an inner "
        "validation split, the test fold is only predicted).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--bags", required=True, type=Path,
                      help="folder of <slide_id>.h5/.pt bags, or a TRIDENT job/tiling folder or "
                      "CLAM feature folder holding one")  # fmt: skip
    data.add_argument("--labels", required=True, type=Path, help="labels CSV")
    data.add_argument("--label-column", default="label", help="label column (default label)")
    data.add_argument("--slide-column", default="slide_id",
                      help="slide-id column (default slide_id)")  # fmt: skip
    data.add_argument("--case-column",
                      help="case/patient column (default case_id when present)")  # fmt: skip
    data.add_argument("--skip-missing", action="store_true",
                      help="leave out slides without a usable bag (missing, empty, failed in "
                      "BAGS/manifest.csv); listed in RUN/skipped_slides.csv")  # fmt: skip
    data.add_argument("--allow-encoder-mismatch", action="store_true",
                      help="train even if bags come from different encoders or tile specs "
                      "(every group is recorded in run.json)")  # fmt: skip
    data.add_argument("--out", required=True, type=Path, help="run folder to write")
    data.add_argument("--folds", type=int, help="k of k-fold CV (default 5, or the split column)")
    data.add_argument("--val-fraction", type=float, default=0.15,
                      help="inner-validation share of each training part (default 0.15)")  # fmt: skip
    data.add_argument("--splits", type=Path, help="reuse a split file (slide_id,fold,split)")
    data.add_argument("--no-finite-check", action="store_true",
                      help="skip the NaN/inf scan of every bag")  # fmt: skip
    model = p.add_argument_group("model")
    model.add_argument("--model", required=True, help="registered aggregator (milkit models)")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="constructor override, repeatable (e.g. dropout=0.1)")  # fmt: skip
    opt = p.add_argument_group(
        "training",
        "Defaults below are milkit's (--preset default); --preset official starts from the "
        "paper code's recipe instead (milkit models NAME --verbose shows it); an option given here wins.",
    )
    opt.add_argument("--preset", default="default", choices=("default", "official"),
                     help="default: milkit's recipe; official: the paper code's recipe")  # fmt: skip
    d = _default  # milkit's defaults, from TrainConfig itself (the "default" preset)
    opt.add_argument("--epochs", type=int, help=f"training epochs ({d('epochs')})")
    opt.add_argument("--lr", type=float, help=f"peak learning rate ({d('lr')})")
    opt.add_argument("--weight-decay", type=float, help=f"weight decay ({d('weight_decay')})")
    opt.add_argument("--optimizer", choices=("adam", "adamw"), help=d("optimizer"))
    opt.add_argument("--scheduler", choices=("cosine", "cosine-epoch", "none"),
                     help=f"LR schedule, cosine stepped per optimiser step or per epoch "
                     f"({d('scheduler')})")  # fmt: skip
    opt.add_argument("--warmup-epochs", type=float, help=f"linear warm-up ({d('warmup_epochs')})")
    opt.add_argument("--batch-size", type=int,
                     help=f"bags per step, padded with a mask ({d('batch_size')})")  # fmt: skip
    opt.add_argument("--accumulate", type=int,
                     help=f"gradient accumulation steps ({d('accumulate')})")  # fmt: skip
    opt.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    opt.add_argument("--class-weights", action="store_true", help="class-weighted loss")
    opt.add_argument("--patience", type=int,
                     help=f"early-stopping patience in epochs ({d('patience', NO_PATIENCE)})")  # fmt: skip
    opt.add_argument("--min-epochs", type=int,
                     help=f"never stop before this epoch ({d('min_epochs')})")  # fmt: skip
    opt.add_argument("--monitor", choices=("val_loss", "val_auc"),
                     help=f"epoch selection on the inner validation set ({d('monitor')}; "
                     "val_auc breaks ties by val_loss and falls back to it when undefined)")  # fmt: skip
    opt.add_argument("--grad-clip", type=float,
                     help=f"gradient norm clip ({d('grad_clip', 'none')})")  # fmt: skip
    opt.add_argument("--max-instances", type=int, help="subsample bags to N instances (train)")
    opt.add_argument("--eval-max-instances", type=int,
                     help="keep N evenly spaced instances of larger validation/test bags "
                     "(to fit memory; default: whole bags)")  # fmt: skip
    opt.add_argument("--feature-dropout", type=float,
                     help=f"share of instances dropped per training bag ({d('feature_dropout')})")  # fmt: skip
    opt.add_argument("--cache", action="store_true", help="keep bags in memory")
    opt.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    opt.add_argument("--seed", type=int, help=f"random seed ({d('seed')})")
    opt.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default auto)")
    opt.add_argument("--workers", type=int, help="DataLoader workers (default 0)")
    opt.add_argument("--threads", type=int,
                     help="torch intra-op threads (default: 1 for small bags, where more threads "
                     "only add overhead, else torch's default)")  # fmt: skip
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--jobs", type=int,
                     help="folds trained at once, one process each (default: one per CPU core "
                     "when bags are small enough for one thread per fold, else 1)")  # fmt: skip
    run.add_argument("--bootstrap", type=int, default=0,
                     help="bootstrap resamples for each fold's AUC CI (default 0: none; folds "
                     "with < 5 slides of a class get a note instead of a CI)")  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_command)


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings → kwargs; values are Python literals when they parse as one."""
    from milkit.errors import MilkitError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise MilkitError("--model-arg must look like key=value", value=item)
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key] = value
    return out


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` equal to the parsed command line (preset + explicit options)."""
    from milkit.training.config import TrainConfig

    overrides = {
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "scheduler": args.scheduler,
        "warmup_epochs": args.warmup_epochs,
        "batch_size": args.batch_size,
        "accumulate": args.accumulate,
        "sampling": "balanced" if args.balanced else None,
        "class_weights": True if args.class_weights else None,
        "patience": args.patience,
        "min_epochs": args.min_epochs,
        "monitor": args.monitor,
        "grad_clip": args.grad_clip,
        "max_instances": args.max_instances,
        "eval_max_instances": args.eval_max_instances,
        "feature_dropout": args.feature_dropout,
        "cache": True if args.cache else None,
        "amp": False if args.no_amp else None,
        "seed": args.seed,
        "device": args.device,
        "num_workers": args.workers,
        "threads": args.threads,
        "progress": False if args.no_progress else None,
    }
    return TrainConfig.for_model(args.model, preset=args.preset, **overrides)


def run_command(args: argparse.Namespace) -> int:
    from milkit.data.labels import load_labels
    from milkit.data.splits import load_splits, make_cv_splits
    from milkit.io.bag_folders import bag_folder_for_cli
    from milkit.io.runs import SPLITS_FILE
    from milkit.models.registry import check_overrides
    from milkit.runtime.distributed import cleanup_distributed, env_world_size
    from milkit.training.cv import cross_validate, format_summary

    model_kwargs = parse_model_args(args.model_arg)
    # The model name and its --model-arg names, once, before any slow work (labels, bag scans);
    # the argument values are checked when cross_validate builds the model, before any fold.
    args.model = check_overrides(args.model, model_kwargs).name
    args.bags = bag_folder_for_cli(args.bags, "milkit train")  # TRIDENT/CLAM trees too
    config = config_from_args(args)
    table = load_labels(args.labels, args.bags, label_column=args.label_column,
                        slide_column=args.slide_column, case_column=args.case_column,
                        skip_missing=args.skip_missing,
                        check_bag_specs=not args.allow_encoder_mismatch,
                        check_finite=not args.no_finite_check)  # fmt: skip
    splits = None
    if args.splits is not None:
        splits = load_splits(args.splits)
    elif (args.folds is not None or not table.has_split) and not (
        args.resume and (args.out / SPLITS_FILE).exists()
    ):
        splits = make_cv_splits(table, folds=args.folds or 5, val_fraction=args.val_fraction,
                                seed=config.seed)  # fmt: skip
    main = int(__import__("os").environ.get("RANK", "0")) == 0
    if main:
        for note in table.notes:
            print(f"milkit train: note: {note}", file=sys.stderr)
        print(
            f"milkit train: {args.model} on {len(table)} slides, classes {table.class_names}, "
            f"in_dim {table.in_dim}, world size {env_world_size()} -> {args.out}",
            file=sys.stderr,
        )
    if args.threads is not None:  # also for the test-fold predictions, outside Trainer.fit
        import torch

        torch.set_num_threads(max(1, args.threads))
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if main:  # one line per warning, like the notes above
            print(f"milkit train: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = show
            result = cross_validate(
                table,
                args.model,
                config,
                args.out,
                folds=args.folds or 5,
                model_kwargs=model_kwargs,
                splits=splits,
                resume=args.resume,
                val_fraction=args.val_fraction,
                bootstrap=args.bootstrap,
                run_info={"labels_csv": str(args.labels), "bags_dir": str(args.bags)},
                fold_jobs=args.jobs,
            )
    finally:
        cleanup_distributed()
    if main:
        for m in result.folds:
            auc = m.get("auc", float("nan"))
            print(f"fold {m.get('fold')}: auc {auc:.3f} acc {m.get('accuracy', float('nan')):.3f}"
                  f" (n={m.get('n')}; epoch {m.get('best_epoch')}: {m.get('selection')})")  # fmt: skip
        if result.summary:
            print(format_summary(result.summary, result.pooled, table.class_names))
        print(f"run folder: {args.out}")
    return 0
