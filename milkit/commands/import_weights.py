"""``milkit import-weights``: weights trained with a paper's official code → a milkit checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  milkit import-weights s_0_checkpoint.pt --family clam --out runs/clam_demo
  milkit import-weights fold_0_model_best_auc.pt --family mhim --out teacher_fold0.pt
  milkit import-weights TransMIL.ckpt.pt --family transmil --model-arg legacy_nystrom=true \\
      --class-names normal,tumor --out runs/transmil_official
  milkit import-weights weights/20240101/fold_0_1.pth --family dsmil --out runs/dsmil

Families: clam (CLAM_SB), ilse (AttentionDeepMIL), transmil, mhim (MHIM-MIL v1/v2 incl. the
shipped init checkpoints), rrt (R2T-MIL), mambamil, aem, dsmil (dsmil-wsi MILNet). Loading is
strict: every official key must map onto the milkit model (or the error lists those that do not).

--out FILE.pt / FILE.safetensors writes one checkpoint (as `milkit train` writes best.pt; usable
as teacher_init and with load_checkpoint). --out FOLDER writes a one-fold run folder
(run.json + fold_0/best.pt) that `milkit predict --run` and `milkit heatmap --run` take.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-weights",
        help="turn official-code weights into a milkit checkpoint",
        description="Load a state dict trained with a paper's official code into the matching "
        "milkit model and save it as a milkit checkpoint or run folder.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="official weights (.pt/.pth/.safetensors)")
    p.add_argument("--family", required=True,
                   help="official code: clam, ilse, transmil, mhim, rrt, mambamil, aem, dsmil")  # fmt: skip
    p.add_argument("--out", required=True, type=Path,
                   help="checkpoint file (.pt/.safetensors) or run folder to write")  # fmt: skip
    p.add_argument("--class-names", help="comma-separated class names (default 0,1,...)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor option the file cannot tell, e.g. legacy_nystrom=true")  # fmt: skip
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="official keys to drop on purpose ('*' = rest of the key)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import sys

    from milkit.commands.train import parse_model_args
    from milkit.errors import MilkitError
    from milkit.io.checkpoint import save_checkpoint
    from milkit.io.runs import BEST_CHECKPOINT, RUN_FILE, fold_dir
    from milkit.models import load_official

    out: Path = args.out
    is_file = out.suffix in (".pt", ".pth", ".safetensors")
    target = out if is_file else fold_dir(out, 0) / BEST_CHECKPOINT
    if (target.exists() or (not is_file and (out / RUN_FILE).exists())) and not args.force:
        raise MilkitError("output exists", path=out, hint="Pass --force to overwrite it")
    imported = load_official(
        args.source, args.family, ignore=list(args.ignore), **parse_model_args(args.model_arg)
    )
    names = None
    if args.class_names:
        names = [c.strip() for c in args.class_names.split(",") if c.strip()]
    meta = imported.checkpoint_meta(names, source=str(args.source))
    if is_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, imported.model, meta)
    else:
        _write_run(out, imported, meta)
    for line in imported.notes:
        print(f"note: {line}", file=sys.stderr)
    print(f"{imported.model_name} ({imported.in_dim} → {imported.num_classes} classes) "
          f"written to {out}")  # fmt: skip
    return 0


def _write_run(out: Path, imported, meta: dict) -> None:
    """A one-fold run folder: ``run.json`` + ``fold_0/best.pt`` (what predict/heatmap read)."""

    from milkit.io.atomic import atomic_write_json
    from milkit.io.checkpoint import save_checkpoint
    from milkit.io.runs import BEST_CHECKPOINT, RUN_FILE, fold_dir

    fold_dir(out, 0).mkdir(parents=True, exist_ok=True)
    save_checkpoint(fold_dir(out, 0) / BEST_CHECKPOINT, imported.model, meta)
    info = {
        "model_name": meta["model_name"],
        "model_kwargs": meta["model_kwargs"],
        "class_names": meta["class_names"],
        "in_dim": meta["in_dim"],
        "train_config": {},  # not trained by milkit
        "folds": 1,
        "milkit_version": meta["milkit_version"],
        "imported_from": meta["imported_from"],
    }
    atomic_write_json(out / RUN_FILE, info)
