"""K-fold cross-validation of one aggregator over a labelled cohort; writes a run folder.

Leak-free protocol (docs/architecture.md §5): early stopping and checkpoint selection use the inner
validation split of each fold; the test fold is predicted once, with the selected checkpoint, and
only then scored. No threshold is tuned on the evaluated predictions (arg-max class).

Run folder (``out_dir``)::

    run.json            model name + kwargs, train config, class names, in_dim, data paths
    splits.csv          slide_id, fold, split
    fold_<k>/best.pt    selected weights (+ last.pt for --resume), log.csv, log.jsonl
    fold_<k>/predictions.csv, metrics.json, roc.png
    summary.json, summary.csv   per-fold test metrics and mean ± std over folds
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import MilkitError
from milkit.io import runs
from milkit.io.atomic import atomic_path, atomic_write_json
from milkit.io.checkpoint import plain
from milkit.io.runs import (
    BEST_CHECKPOINT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FILE,
    SPLITS_FILE,
    SUMMARY_FILE,
    read_fold_predictions,
)
from milkit.runtime.device import resolve_device
from milkit.runtime.distributed import barrier, setup_distributed
from milkit.runtime.seeds import seed_everything
from milkit.training.config import TrainConfig
from milkit.training.trainer import Predictions, Trainer, predict


@dataclass
class CVResult:
    """Per-fold test metrics, their mean ± std summary, and where everything was written."""

    out_dir: Path
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    splits: list[Any]
    pooled: dict[str, Any] | None = None  # metrics of all test predictions pooled (out-of-fold)


def build_model(model_name: str, in_dim: int, num_classes: int, model_kwargs: Mapping | None):
    """``models.create`` with registry errors turned into one-line MilkitErrors."""
    from milkit import models

    try:
        return models.create(model_name, in_dim, num_classes, **dict(model_kwargs or {}))
    except MilkitError:  # an unknown name (UnknownNameError) already says it all
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise MilkitError(f"cannot build model {model_name!r}: {err}") from None


def write_fold_outputs(
    fold_dir: Path,
    preds: Predictions,
    class_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write predictions.csv, metrics.json and roc.png of one fold; return the metrics."""
    from milkit.training.metrics import auc_ci, classification_metrics, plot_roc

    frame = preds.to_frame(class_names)
    with atomic_path(fold_dir / PREDICTIONS_FILE) as tmp:
        frame.to_csv(tmp, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from a small test fold: AUC = NaN
        metrics = classification_metrics(preds.labels, preds.probs, class_names)
    metrics = {**dict(extra or {}), **metrics}
    if bootstrap > 0:  # no CI (a note and a warning) for folds too small to give one
        metrics.update(auc_ci(preds.labels, preds.probs, n_boot=bootstrap, seed=seed))
    atomic_write_json(fold_dir / METRICS_FILE, metrics)
    if len(np.unique(preds.labels)) > 1:
        plot_roc(preds.labels, preds.probs, class_names, fold_dir / "roc.png",
                 title=f"{fold_dir.name}: AUC {metrics['auc']:.3f}")  # fmt: skip
    return metrics


def write_summary(
    out_dir: Path,
    fold_metrics: list[dict[str, Any]],
    header: Mapping,
    pooled: Mapping[str, Any] | None = None,
) -> dict:
    """summary.json (per fold, mean/std, pooled) and summary.csv (one row per fold + mean + std
    + pooled). In a multiclass run the CSV's AUC column is ``auc_macro_ovr``."""
    import pandas as pd

    from milkit.training.metrics import summarise_folds

    summary = summarise_folds([{k: v for k, v in m.items() if k != "fold"} for m in fold_metrics])
    body = {**dict(header), "folds": fold_metrics, "summary": summary}
    if pooled is not None:
        body["pooled"] = dict(pooled)
    atomic_write_json(out_dir / SUMMARY_FILE, body)
    keys = list(summary)
    rows = [{"fold": m.get("fold"), **{k: m.get(k) for k in keys}} for m in fold_metrics]
    rows.append({"fold": "mean", **{k: summary[k]["mean"] for k in keys}})
    rows.append({"fold": "std", **{k: summary[k]["std"] for k in keys}})
    if pooled is not None:
        rows.append({"fold": "pooled", **{k: pooled.get(k) for k in keys}})
    frame = pd.DataFrame(rows)
    names = (pooled or {}).get("class_names") or header.get("class_names") or []
    if len(names) > 2:
        frame = frame.rename(columns={"auc": "auc_macro_ovr"})
    with atomic_path(out_dir / "summary.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return summary


def _cohort_info(table: Any) -> dict[str, Any]:
    """run.json keys about the bags: their encoder/tile spec and what reading the labels did."""
    from milkit.data.provenance import describe_group, group_specs

    specs = getattr(table, "bag_specs", None) or {}
    out: dict[str, Any] = {"bag_spec": table.bag_spec if specs else None}
    groups = group_specs(specs)
    if len(groups) > 1:  # only with --allow-encoder-mismatch
        out["bag_spec_groups"] = [describe_group(spec, ids) for spec, ids in groups]
    out["label_notes"] = list(getattr(table, "notes", []) or [])
    out["skipped_slides"] = [list(s) for s in getattr(table, "skipped", []) or []]
    return out


def _record_fold(
    out_dir: Path, info: dict[str, Any], metrics: Mapping[str, Any], main: bool
) -> None:
    """Add a fold's epoch selection and warnings to run.json (rewritten atomically)."""
    fold = metrics.get("fold")
    info.setdefault("selection", {})[str(fold)] = {
        "epoch": metrics.get("best_epoch"),
        "monitor": metrics.get("monitor"),
        "reason": metrics.get("selection"),
    }
    notes = info.setdefault("warnings", [])
    notes[:] = [n for n in notes if not n.startswith(f"fold {fold}: ")]
    notes.extend(f"fold {fold}: {w}" for w in metrics.get("warnings", []) or [])
    if main:
        atomic_write_json(out_dir / RUN_FILE, info)


# Cohorts whose bag files add up to less than this are cached in memory while training (each
# fold reads every bag once instead of once per epoch); larger ones only with --cache.
AUTO_CACHE_BYTES = 1024**3


def _fits_in_memory(table: Any, config: TrainConfig) -> bool:
    """True when the cohort's bags are small enough to keep in memory (no DataLoader workers)."""
    import os

    if config.num_workers > 0:  # each worker would hold its own copy, rebuilt every epoch
        return False
    total = 0
    for path in table.frame["bag_path"]:
        try:
            total += os.path.getsize(path)
        except OSError:
            return False
        if total > AUTO_CACHE_BYTES:
            return False
    return True


def _check_existing_run(out_dir: Path, info: Mapping[str, Any], resume: bool) -> None:
    run_file = out_dir / RUN_FILE
    if not run_file.exists():
        return
    if not resume:
        raise MilkitError(
            "run folder already holds a run",
            path=out_dir,
            hint="Use --resume to continue it, or choose another --out",
        )
    old = json.loads(run_file.read_text())
    for key in ("model_name", "model_kwargs", "class_names", "in_dim"):
        if old.get(key) != info.get(key):
            raise MilkitError(
                f"cannot resume: {key} differs from the existing run",
                value=info.get(key),
                path=run_file,
                hint=f"The run was started with {key}={old.get(key)!r}",
            )
    # the bags' encoder/tile spec (runs from before it was recorded are not compared)
    old_spec, new_spec = old.get("bag_spec"), info.get("bag_spec")
    if old_spec and new_spec:
        keys = ("encoder", "encoder_weights_sha256", "patch_size", "resolution")
        changed = {k: new_spec.get(k) for k in keys if old_spec.get(k) != new_spec.get(k)}
        if changed:
            raise MilkitError(
                "cannot resume: the bags come from another encoder or tile spec than the run's",
                value=changed,
                path=run_file,
                hint="The run was started with "
                + ", ".join(f"{k}={old_spec.get(k)!r}" for k in changed)
                + "; resume with those bags, or start a new --out",
            )


def _train_fold(
    *,
    split: Any,
    table: Any,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    config: TrainConfig,
    out_dir: Path,
    class_names: list[str],
    ds_kw: Mapping[str, Any],
    resume: bool,
    bootstrap: int,
    device: Any,
    is_main: bool,
    n_folds: int = 0,
) -> dict[str, Any] | None:
    """Train one fold, predict its test part, write its outputs; the fold's metrics (None on a
    non-main DDP rank). ``n_folds`` labels the progress bar (``fold k/K``)."""
    from milkit.data.datasets import BagDataset

    fold_dir = runs.fold_dir(out_dir, split.fold)
    done = fold_dir / METRICS_FILE
    seed_everything(config.seed)
    model = build_model(model_name, table.in_dim, len(class_names), model_kwargs)
    train_ds = BagDataset.from_table(
        table,
        split.train,
        max_instances=config.max_instances,
        feature_dropout=config.feature_dropout,
        seed=config.seed,
        **ds_kw,
    )
    val_ds = BagDataset.from_table(table, split.val, **ds_kw) if split.val else None
    trainer = Trainer(
        model,
        config,
        fold_dir,
        class_names,
        model_name=model_name,
        model_kwargs=model_kwargs,
        in_dim=table.in_dim,
        progress_label=f"fold {split.fold + 1}/{n_folds}" if n_folds else "",
    )
    fit = trainer.fit(train_ds, val_ds, resume=resume)
    extra = {
        "fold": split.fold,
        "best_epoch": fit.best_epoch,
        "best_val_score": fit.best_score,
        "monitor": fit.monitor,
        "requested_monitor": config.monitor,
        "selection": fit.selection.get("reason"),
        "warnings": list(fit.warnings),
        "epochs_run": len(fit.history),
        "n_train": len(split.train),
        "n_val": len(split.val),
    }
    if split.test and is_main:
        test_ds = BagDataset.from_table(table, split.test, **ds_kw)
        preds = predict(model, test_ds, batch_size=config.batch_size, device=device,
                        phase="test", oom_kwargs=trainer._oom_kwargs())  # fmt: skip
        metrics = write_fold_outputs(fold_dir, preds, class_names, extra,
                                     bootstrap=bootstrap, seed=config.seed)  # fmt: skip
        return metrics
    elif is_main:
        metrics = {**extra, "n": 0}
        atomic_write_json(done, metrics)
        return metrics
    return None


def _fold_worker(job: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """``_train_fold`` in a worker process; its warnings are returned for the parent to show."""
    import pickle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            metrics = _train_fold(**job)
        except MilkitError as err:  # must cross the process boundary with its message intact
            try:
                pickle.loads(pickle.dumps(err))
            except Exception:
                raise MilkitError(str(err)) from None
            raise
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning | RuntimeWarning)]
    return metrics, list(dict.fromkeys(notes))


# Below this many training steps (~1 ms each for small bags) folds run one after another.
PARALLEL_MIN_STEPS = 20_000


def _fold_jobs(
    requested: int | None,
    table: Any,
    config: TrainConfig,
    device: Any,
    distributed: bool,
    pending: int,
) -> int:
    """Folds to train at once. Auto (None): one per CPU core when each fold's steps run on one
    thread (small bags on the CPU, ``milkit.runtime.threads``), so the other cores are not left idle, and
    the run is long enough (``PARALLEL_MIN_STEPS`` training steps) to repay starting a process
    per core (~3 s of imports each); otherwise one. Never with DDP, a GPU or DataLoader workers."""
    import os

    if pending < 2 or distributed or device.type != "cpu" or config.num_workers > 0:
        return 1
    if requested is not None:
        return max(1, min(int(requested), pending))
    from milkit.data.datasets import BagDataset
    from milkit.runtime.threads import choose_threads

    if config.threads not in (None, 1):
        return 1
    if config.epochs * len(table) * pending * (1 - 1 / max(pending, 2)) < PARALLEL_MIN_STEPS:
        return 1
    probe = BagDataset.from_table(table)
    if choose_threads(None, probe, batch_size=config.batch_size) != 1:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, pending))


def cross_validate(
    table: Any,
    model_name: str,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    folds: int = 5,
    model_kwargs: Mapping[str, Any] | None = None,
    splits: Sequence[Any] | None = None,
    resume: bool = False,
    val_fraction: float = 0.15,
    bootstrap: int = 0,
    run_info: Mapping[str, Any] | None = None,
    fold_jobs: int | None = None,
) -> CVResult:
    """Train and test ``model_name`` on every fold of ``table`` (a ``milkit.data.labels.LabelTable``).

    Args:
        table: the validated cohort.
        model_name: a registered aggregator (``milkit models``).
        config: training config (the same for every fold; each fold is seeded with
            ``config.seed`` so a fold can be rerun alone).
        out_dir: the run folder.
        folds: number of folds when ``splits`` is not given (a table with a ``split`` column
            uses its one fixed split instead).
        model_kwargs: constructor overrides for the aggregator.
        splits: precomputed ``FoldSplit`` list (e.g. ``load_splits``); validated against table.
        resume: continue a crashed run: finished folds (``metrics.json``) are kept, a fold with
            a ``last.pt`` resumes from it, the saved ``splits.csv`` is reused.
        val_fraction: inner-validation share of each fold's training cases.
        bootstrap: resamples for a bootstrap 95 % CI of each fold's AUC (0: none).
        run_info: extra keys for run.json (e.g. the labels CSV and bags dir).
        fold_jobs: folds trained at once, each in its own process (CPU only, not with DDP).
            None: one per CPU core when the bags are small enough for one intra-op thread per
            fold (``milkit.runtime.threads``), else 1. Results equal a one-at-a-time run (each fold is
            seeded alone).
    """
    from milkit.data.splits import (
        fixed_split,
        load_splits,
        make_cv_splits,
        save_splits,
        validate_splits,
    )

    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    dist_info = setup_distributed(device)
    model_kwargs = dict(model_kwargs or {})
    class_names = list(table.class_names)
    # Fail on a model typo before anything is written.
    build_model(model_name, table.in_dim, len(class_names), model_kwargs)
    from milkit import __version__

    info = {
        "model_name": model_name,
        "model_kwargs": plain(model_kwargs),
        "class_names": class_names,
        "in_dim": int(table.in_dim),
        "train_config": config.to_dict(),
        "labels_csv": str(table.csv_path) if getattr(table, "csv_path", None) else None,
        "bags_dir": str(table.bags_dir) if getattr(table, "bags_dir", None) else None,
        "milkit_version": __version__,
        **_cohort_info(table),
        **dict(run_info or {}),
    }
    _check_existing_run(out_dir, info, resume)
    barrier()  # every rank checks before rank 0 writes run.json (else rank 1 sees "a run")

    splits_path = out_dir / SPLITS_FILE
    if splits is None and resume and splits_path.exists():
        splits = load_splits(splits_path)
    if splits is None:
        if getattr(table, "has_split", False):
            splits = [fixed_split(table)]
        else:
            splits = make_cv_splits(table, folds=folds, val_fraction=val_fraction, seed=config.seed)
    else:
        validate_splits(splits, table)
    splits = list(splits)
    info["folds"] = len(splits)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_splits(splits, splits_path)
        if callable(getattr(table, "write_skipped", None)):
            table.write_skipped(out_dir)  # skipped_slides.csv (--skip-missing)
        info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(out_dir / RUN_FILE, info)
    barrier()

    # eval_max_instances: larger validation/test bags keep that many evenly spaced instances
    ds_kw = {"cache": config.cache, "eval_max_instances": config.eval_max_instances}
    ds_kw["cache"] = ds_kw["cache"] or _fits_in_memory(table, config)
    fold_metrics: list[dict[str, Any]] = []
    todo: list[Any] = []
    for split in splits:
        fold_dir = runs.fold_dir(out_dir, split.fold)
        done = fold_dir / METRICS_FILE
        if resume and done.exists() and (fold_dir / BEST_CHECKPOINT).exists():
            fold_metrics.append(json.loads(done.read_text()))
            _record_fold(out_dir, info, fold_metrics[-1], dist_info.is_main)
            continue
        if resume and done.exists():  # finished by an older milkit without a selected model
            warnings.warn(
                f"{fold_dir.name} has test metrics but no best.pt (no epoch was ever selected, "
                "so they came from the last epoch's weights); retraining this fold",
                stacklevel=2,
            )
        todo.append(split)

    def record(metrics: dict[str, Any] | None) -> None:
        if metrics is not None and dist_info.is_main:
            fold_metrics.append(metrics)
            _record_fold(out_dir, info, metrics, True)

    job = {"table": table, "model_name": model_name, "model_kwargs": model_kwargs,
           "config": config, "out_dir": out_dir, "class_names": class_names, "ds_kw": ds_kw,
           "resume": resume, "bootstrap": bootstrap, "device": device,
           "is_main": dist_info.is_main, "n_folds": len(splits)}  # fmt: skip
    jobs = _fold_jobs(fold_jobs, table, config, device, dist_info.enabled, len(todo))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        quiet = {**job, "config": replace(config, progress=False)}  # no interleaved bars
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_fold_worker, {**quiet, "split": sp}) for sp in todo]
            for future in as_completed(futures):
                metrics, notes = future.result()
                for note in notes:  # the fold's warnings, shown by this process
                    warnings.warn(note, stacklevel=2)
                record(metrics)
    else:
        for split in todo:
            record(_train_fold(split=split, **job))
            barrier()
    fold_metrics.sort(key=lambda m: int(m.get("fold", 0)))

    summary: dict[str, dict[str, float]] = {}
    pooled: dict[str, Any] | None = None
    scored = [m for m in fold_metrics if m.get("n", 0) > 0]
    if dist_info.is_main and scored:
        from milkit.training.metrics import pooled_metrics

        header = {"model_name": model_name, "model_kwargs": info["model_kwargs"],
                  "class_names": class_names}  # fmt: skip
        wanted = {m.get("fold") for m in scored}
        parts = [(y, p) for k, y, p in read_fold_predictions(out_dir, class_names) if k in wanted]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undefined AUC: reported as NaN
            pooled = pooled_metrics([y for y, _ in parts], [p for _, p in parts], class_names,
                                    bootstrap=bootstrap, seed=config.seed)  # fmt: skip
        if "auc_ci_note" in pooled:
            warnings.warn(f"pooled out-of-fold AUC: {pooled['auc_ci_note']}", stacklevel=2)
        summary = write_summary(out_dir, scored, header, pooled)
    return CVResult(out_dir=out_dir, folds=fold_metrics, summary=summary, splits=splits,
                    pooled=pooled)  # fmt: skip


def format_summary(
    summary: Mapping[str, Mapping[str, float]],
    pooled: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> str:
    """Mean ± std over folds of the scalar metrics, beside the pooled out-of-fold value.

    ``auc               0.912 ± 0.031 (5 folds)   pooled 0.905 [0.861, 0.944]``; the AUC's title
    says how it averages over classes (``milkit.training.metrics.auc_label``).
    """
    from milkit.training.metrics import auc_label, format_number

    names = list(class_names or (pooled or {}).get("class_names") or [])
    lines = [f"{'metric':<18} {'mean ± std over folds':<26} pooled out-of-fold"]
    for key in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        if key not in summary:
            continue
        title = auc_label(names) if key == "auc" and names else key
        m, s, k = summary[key]["mean"], summary[key]["std"], summary[key].get("n")
        cell = f"{format_number(m)} ± {format_number(s)}" + (
            f" ({k} folds)" if k is not None else ""
        )
        if not math.isfinite(m):
            cell = "n/a"
        line = f"{title:<18} {cell:<26}"
        if pooled is not None:
            line += f" {format_number(pooled.get(key))}"
            if key == "auc" and "auc_ci_low" in pooled:
                line += f" [{format_number(pooled['auc_ci_low'])}, {format_number(pooled['auc_ci_high'])}]"
        lines.append(line.rstrip())
    if pooled is not None and names and len(names) > 2:
        lines.append("auc (macro OvR): mean over classes of the one-vs-rest AUC")
    return "\n".join(lines)
