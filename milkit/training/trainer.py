"""The training loop shared by every aggregator (docs/architecture.md §5, §6).

The ``Trainer`` calls nothing model-specific beyond the three hooks of the model contract —
``forward``, ``training_loss(batch, output, criterion)`` and ``on_train_step_end(step, total)`` —
so MHIM (EMA teacher), AEM (entropy loss) and SC-MIL train through the same loop as ABMIL.

What it does: Adam/AdamW, a per-optimiser-step cosine schedule with linear warmup, AMP on CUDA,
gradient accumulation, class weights or balanced sampling, early stopping on the *inner
validation* set (never the test fold), the best checkpoint (``best.pt``) and a resumable state
(``last.pt``, every epoch), a CSV + JSONL metrics log (and TensorBoard when installed), and DDP when
launched by ``torchrun``. With fixed seeds a CPU run is bit-reproducible, and a run killed after
any epoch and resumed gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_write_text
from milkit.io.checkpoint import (
    load_train_state,
    plain,
    read_checkpoint,
    save_checkpoint,
    save_train_state,
)
from milkit.io.runs import BEST_CHECKPOINT, LAST_CHECKPOINT
from milkit.runtime.device import resolve_device
from milkit.runtime.distributed import (
    DistInfo,
    EpochSampler,
    broadcast_flag,
    setup_distributed,
)
from milkit.runtime.oom import oom_context
from milkit.runtime.seeds import rng_state, seed_everything, set_rng_state
from milkit.training.config import TrainConfig
from milkit.training.selection import (
    MIN_VAL_SLIDES,
    FitState,
    describe_selection,
    saturation_notes,
    selection_key,
)

__all__ = [
    "FitResult",
    "Predictions",
    "Trainer",
    "fit_model",
    "predict",
]


@dataclass
class FitResult:
    """Outcome of ``Trainer.fit``: best epoch (0-based) and score, per-epoch log, best.pt path."""

    best_epoch: int
    best_score: float | None
    history: list[dict[str, Any]]
    checkpoint: Path | None
    monitor: str = "val_loss"  # the criterion actually used (after any fallback)
    stopped_early: bool = False
    # How the kept epoch was chosen: {"epoch", "monitor", "requested_monitor", "score",
    # "val_loss", "reason"}; and what the user should know about it (small or saturated
    # validation set, a fallback), also emitted as warnings.
    selection: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    """Per-slide outputs of ``predict``: probabilities (n, C) and, on request, attention."""

    slide_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    attention: list[np.ndarray] | None = None

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def to_frame(self, class_names: Sequence[str]):
        """pandas table ``slide_id, label, pred, prob_<class>...`` (labels/preds as names)."""
        import pandas as pd

        names = list(class_names)

        def name(i: int) -> str:
            return names[i] if 0 <= i < len(names) else ""

        frame = pd.DataFrame(
            {
                "slide_id": self.slide_ids,
                "label": [name(int(i)) for i in self.labels],
                "pred": [name(int(i)) for i in self.preds],
            }
        )
        for c, cname in enumerate(names):
            frame[f"prob_{cname}"] = self.probs[:, c]
        return frame


def _collate() -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    from milkit.data.collate import collate_bags

    return collate_bags


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("features", "mask", "coords", "label"):
        value = out.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
    return out


def _set_train_mode(dataset: Dataset, on: bool) -> None:
    """Switch a dataset's augmentations (part A's ``dataset.train(bool)``) if it has them."""
    fn = getattr(dataset, "train", None)
    if callable(fn):
        fn(on)


def _cosine_lambda(total_steps: int, warmup_steps: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _cosine_epoch_lambda(
    steps_per_epoch: int, epochs: int, warmup_epochs: int, floor: float
) -> Callable[[int], float]:
    """The cosine of ``_cosine_lambda`` over EPOCHS, held constant within each epoch: the LR of
    ``CosineAnnealingLR(T_max=epochs, eta_min=floor·lr)`` stepped once per epoch."""
    per_epoch = _cosine_lambda(epochs, warmup_epochs, floor)
    return lambda step: per_epoch(step // steps_per_epoch)


class _TrainStep(nn.Module):
    """``model(batch) -> training_loss`` as one module call: ``(loss, logs)``.

    DDP registers parameter use only inside its wrapped ``forward``; wrapping this step (not the
    bare model) covers every parameter a model's ``training_loss`` touches, for every model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, Any], criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        output = self.model(batch["features"], mask=batch.get("mask"), coords=batch.get("coords"))
        return self.model.training_loss(batch, output, criterion)


class _Weights:
    """A state dict with the ``state_dict()`` method ``save_checkpoint`` reads."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise MilkitError(
            "training dataset has no labels", hint="Build it with labels (BagDataset(..., labels=))"
        )
    return np.asarray(labels, dtype=np.int64)


class Trainer:
    """Fits one aggregator; writes ``best.pt``, ``last.pt`` and ``log.csv``/``log.jsonl``.

    Args:
        model: an aggregator (``MILModel``) built for this task.
        config: the ``TrainConfig``.
        out_dir: folder for checkpoints and logs (None: nothing is written; the best weights are
            kept in memory).
        class_names: label map stored in checkpoints (default ``"0".."C-1"``).
        model_name, model_kwargs, in_dim: stored in checkpoints so ``load_checkpoint`` can rebuild
            the model with ``models.create``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        out_dir: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        *,
        model_name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        in_dim: int | None = None,
        progress_label: str = "",
    ) -> None:
        self.model = model
        # progress bar: "fold 2/5 epoch 7/50" and the last epoch's validation numbers
        self.progress_label = progress_label
        self._last_val: dict[str, str] = {}
        self.config = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.class_names = (
            [str(c) for c in class_names] if class_names else [str(i) for i in range(num_classes)]
        )
        self.model_name = model_name or getattr(model, "milkit_name", None)
        self.model_kwargs = dict(model_kwargs or {})
        self.in_dim = in_dim if in_dim is not None else getattr(model, "in_dim", None)
        self.device = resolve_device(self.config.device)
        self.dist: DistInfo = setup_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)

    # ------------------------------------------------------------------ paths and metadata
    @property
    def best_path(self) -> Path | None:
        return self.out_dir / BEST_CHECKPOINT if self.out_dir else None

    @property
    def last_path(self) -> Path | None:
        return self.out_dir / LAST_CHECKPOINT if self.out_dir else None

    def checkpoint_meta(
        self,
        epoch: int | None = None,
        score: float | None = None,
        *,
        monitor: str | None = None,
        selection: str | None = None,
    ) -> dict:
        from milkit import __version__

        return {
            "model_name": self.model_name,
            "model_kwargs": plain(self.model_kwargs),
            "class_names": list(self.class_names),
            "in_dim": self.in_dim,
            "num_classes": len(self.class_names),
            "train_config": self.config.to_dict(),
            "epoch": epoch,
            "score": score,
            "monitor": monitor or self.config.monitor,
            "selection": selection,
            "milkit_version": __version__,
        }

    # ------------------------------------------------------------------ building blocks
    def _loader(
        self, dataset: Dataset, sampler: EpochSampler | None, shuffle_seed: int
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=_collate(),
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(shuffle_seed),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        # The fused kernel updates all parameters in one call: the same Adam(W) update (equal up
        # to float rounding), ~2x less optimiser time on CPU, where torch's default is a
        # per-parameter Python loop that dominates small-bag steps. Falls back where unsupported.
        devices = {p.device.type for p in params}
        if len(devices) == 1 and devices <= {"cpu", "cuda"}:
            try:
                return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _criterion(self, labels: np.ndarray) -> nn.Module:
        weight = None
        if self.config.class_weights:
            from milkit.data.sampling import class_weights

            weight = torch.as_tensor(
                np.asarray(class_weights(labels, len(self.class_names)), dtype=np.float32)
            ).to(self.device)
        return nn.CrossEntropyLoss(weight=weight)

    def _amp(self) -> tuple[bool, torch.dtype]:
        on = bool(self.config.amp) and self.device.type == "cuda"
        dtype = torch.bfloat16 if on and torch.cuda.is_bf16_supported() else torch.float16
        return on, dtype

    # ------------------------------------------------------------------ fit
    def fit(
        self, train_ds: Dataset, val_ds: Dataset | None = None, *, resume: bool = False
    ) -> FitResult:
        """Train on ``train_ds``; select the epoch to keep on ``val_ds`` (inner validation).

        Selection (``config.monitor``): ``val_loss`` keeps the epoch with the lowest validation
        cross-entropy; ``val_auc`` the highest validation AUC, ties going to the lower val_loss.
        When the AUC is undefined (the validation set lacks a class) selection falls back to
        val_loss; when no epoch has a finite score the last epoch is kept. So every finished fit
        writes ``best.pt``, and ``FitResult.selection`` says which epoch and why. With no
        ``val_ds`` the last epoch is kept. Early stopping (``config.patience``) counts epochs
        without a better selection score, never before ``config.min_epochs``.

        A validation set smaller than ``MIN_VAL_SLIDES``, lacking a class, or whose AUC saturates
        at 1.0 is reported as a warning and in ``FitResult.warnings``.

        ``resume=True`` continues from ``out_dir/last.pt`` when it exists (a finished run
        returns at once). A ``last.pt`` without its ``best.pt`` (a run whose selected weights
        were never written) cannot be completed: the fit then starts again, with a warning.

        Intra-op threads: ``config.threads``, or one thread for small bags
        (``milkit.runtime.threads.choose_threads``); the previous setting is restored afterwards.
        """
        from milkit.runtime.threads import choose_threads, intra_op_threads

        threads = choose_threads(self.config.threads, train_ds, batch_size=self.config.batch_size)
        with intra_op_threads(threads):
            return self._fit(train_ds, val_ds, resume=resume)

    def _selection_plan(self, val_ds: Dataset | None) -> tuple[str, list[str]]:
        """The monitor to use on ``val_ds`` and warnings about the validation set itself."""
        monitor = self.config.monitor
        notes: list[str] = []
        if val_ds is None:
            return monitor, notes
        val_labels = getattr(val_ds, "labels", None)
        if val_labels is None:
            return monitor, notes
        counts = np.bincount(
            np.asarray(val_labels, dtype=np.int64), minlength=len(self.class_names)
        )
        per_class = {name: int(c) for name, c in zip(self.class_names, counts, strict=False)}
        missing = [name for name, c in per_class.items() if c == 0]
        if missing:
            if monitor == "val_auc":
                monitor = "val_loss"
                notes.append(
                    f"validation set lacks class(es) {missing}: val AUC is undefined, "
                    "selecting the epoch on val_loss instead"
                )
            else:
                notes.append(
                    f"validation set lacks class(es) {missing}: val_loss covers only the "
                    "classes present"
                )
        if len(val_labels) < MIN_VAL_SLIDES:
            notes.append(
                f"validation set has only {len(val_labels)} slide(s) {per_class}: epoch selection "
                "on it is noisy (use more slides or a larger --val-fraction)"
            )
        return monitor, notes

    def _fit(self, train_ds: Dataset, val_ds: Dataset | None, *, resume: bool) -> FitResult:
        cfg = self.config
        if len(train_ds) == 0:
            raise MilkitError("training set is empty", hint="Check the labels CSV and the splits")
        labels = _dataset_labels(train_ds)
        if val_ds is not None and len(val_ds) == 0:
            val_ds = None
        monitor, notes = self._selection_plan(val_ds)

        model = self.model.to(self.device)
        weights = None
        if cfg.sampling == "balanced":
            from milkit.data.sampling import balanced_weights

            weights = balanced_weights(labels)
        sampler = EpochSampler(
            len(train_ds),
            seed=cfg.seed,
            weights=weights,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        loader = self._loader(train_ds, sampler, cfg.seed)
        batches = len(loader)
        steps_per_epoch = -(-batches // cfg.accumulate)
        total_steps = steps_per_epoch * cfg.epochs
        optimizer = self._optimizer()
        if cfg.scheduler == "cosine":
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
            floor = cfg.min_lr / cfg.lr
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _cosine_lambda(total_steps, warmup, floor)
            )
        elif cfg.scheduler == "cosine-epoch":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                _cosine_epoch_lambda(
                    steps_per_epoch, cfg.epochs, round(cfg.warmup_epochs), cfg.min_lr / cfg.lr
                ),
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        amp_on, amp_dtype = self._amp()
        scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)
        criterion = self._criterion(labels)
        # One call runs forward AND training_loss: auxiliary heads and losses (SC-MIL's
        # projection, AEM's entropy, MHIM's masking) then use their parameters inside the
        # DDP-wrapped forward, as DDP requires ("mark a variable ready only once" otherwise).
        net: nn.Module = _TrainStep(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                net,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # MIL models may skip branches on some bags
            )

        st = FitState(monitor)
        if (
            resume
            and self.last_path is not None
            and self.last_path.exists()
            and self.best_path is not None
            and not self.best_path.exists()
        ):
            # Older milkit could finish a fit without ever writing best.pt (an undefined val
            # AUC at every epoch); the selected weights are gone, so the fold is trained again.
            warnings.warn(
                f"{self.out_dir}: last.pt has no best.pt beside it (no epoch was ever "
                "selected); training this fold again from scratch",
                stacklevel=3,
            )
            resume = False
        if resume and self.last_path is not None and self.last_path.exists():
            state = load_train_state(self.last_path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            st = FitState.resumed(state, monitor)
            if self.best_path is not None and self.best_path.exists():
                st.best_state = read_checkpoint(self.best_path)[0]
        else:
            seed_everything(cfg.seed + self.dist.rank)

        writer = self._tensorboard()
        epoch = st.start_epoch - 1
        unsaved: list[dict[str, Any]] = []  # rows not yet in the logs
        best_unsaved = False  # best_state newer than best.pt
        last_save = -math.inf
        for epoch in range(st.start_epoch, cfg.epochs):
            if st.stopped:
                break
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            if callable(getattr(train_ds, "set_epoch", None)):
                train_ds.set_epoch(epoch)  # reseeds part A's augmentations (resume-exact)
            train_logs, st.global_step = self._train_epoch(
                net, model, loader, optimizer, scheduler, scaler, criterion,
                epoch, st.global_step, total_steps, amp_on, amp_dtype,
            )  # fmt: skip
            row: dict[str, Any] = {"epoch": epoch, **train_logs}
            if val_ds is not None:
                row.update(self._validate(model, val_ds, criterion))
                self._last_val = {k: f"{row[k]:.4f}" for k in ("val_loss", "val_auc")
                                  if isinstance(row.get(k), float) and math.isfinite(row[k])}  # fmt: skip
            row["time_s"] = round(time.perf_counter() - t0, 3)
            st.history.append(row)

            score = row.get(st.monitor) if val_ds is not None else None
            key = selection_key(row, st.monitor) if val_ds is not None else None
            if val_ds is None or (key is not None and (st.best_key is None or key > st.best_key)):
                st.keep(epoch, score, key, model)
                best_unsaved = True
            else:
                st.bad_epochs += 1
            if (
                cfg.patience is not None
                and val_ds is not None
                and st.bad_epochs >= cfg.patience
                and epoch + 1 >= cfg.min_epochs
            ):
                st.stopped = True
            st.stopped = broadcast_flag(st.stopped, self.device)
            row["best_epoch"] = st.best_epoch
            unsaved.append(row)
            due = (
                epoch == st.start_epoch
                or st.stopped
                or epoch + 1 >= cfg.epochs
                or time.perf_counter() - last_save >= cfg.checkpoint_every_s
            )
            if self.dist.is_main and due:
                last_save = time.perf_counter()
                if best_unsaved and st.best_state is not None and self.best_path is not None:
                    # best.pt before last.pt: a last.pt on disk always has its best.pt
                    best_meta = self.checkpoint_meta(st.best_epoch, st.best_score,
                                                     monitor=st.monitor,
                                                     selection="selected so far")  # fmt: skip
                    save_checkpoint(self.best_path, _Weights(st.best_state), best_meta)
                best_unsaved = False
                self._write_logs(st.history, writer, unsaved)
                unsaved = []
                if self.last_path is not None:
                    save_train_state(
                        self.last_path,
                        {
                            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "rng": rng_state(),
                            "epoch": epoch,
                            **st.saved(),
                            "meta": self.checkpoint_meta(epoch, score, monitor=st.monitor),
                        },
                    )
            self._after_epoch(epoch)
        if writer is not None:
            writer.close()

        if st.best_epoch < 0 and st.history:
            # No epoch had a finite score: keep the last one rather than leave no model.
            st.keep(int(st.history[-1]["epoch"]), None, st.best_key, model)
            notes.append(
                f"no epoch had a finite {st.monitor}; the last epoch ({st.best_epoch}) is kept"
            )
        selection = describe_selection(st.history, st.best_epoch, st.monitor, cfg.monitor, val_ds)
        notes.extend(saturation_notes(st.history, st.monitor))
        for note in notes:
            if self.dist.is_main:
                warnings.warn(note if self.out_dir is None else f"{self.out_dir}: {note}",
                              stacklevel=3)  # fmt: skip

        # Leave the model holding the selected (best) weights; best.pt gets the final reason.
        if st.best_state is not None:
            model.load_state_dict(st.best_state)
            if self.dist.is_main and self.best_path is not None:
                meta = self.checkpoint_meta(st.best_epoch, st.best_score, monitor=st.monitor,
                                            selection=selection["reason"])  # fmt: skip
                save_checkpoint(self.best_path, model, meta)
        model.eval()
        return FitResult(
            best_epoch=st.best_epoch,
            best_score=st.best_score,
            history=st.history,
            checkpoint=self.best_path if self.best_path and self.best_path.exists() else None,
            monitor=st.monitor,
            stopped_early=st.stopped and epoch + 1 < cfg.epochs,
            selection=selection,
            warnings=notes,
        )

    def _after_epoch(self, epoch: int) -> None:
        """Hook called after each epoch's files are written (tests simulate crashes here)."""

    def _train_epoch(
        self,
        net: nn.Module,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        criterion: nn.Module,
        epoch: int,
        global_step: int,
        total_steps: int,
        amp_on: bool,
        amp_dtype: torch.dtype,
    ) -> tuple[dict[str, Any], int]:
        cfg = self.config
        net.train()  # also sets model.train() (net wraps it)
        _set_train_mode(loader.dataset, True)
        batches = len(loader)
        sums: dict[str, float] = {}
        n_seen = 0
        optimizer.zero_grad(set_to_none=True)
        label = f"{self.progress_label} " if self.progress_label else ""
        bar = self._progress(loader, desc=f"{label}epoch {epoch + 1}/{cfg.epochs}")
        for i, batch in enumerate(bar):
            batch = _to_device(batch, self.device)
            group_start = (i // cfg.accumulate) * cfg.accumulate
            group_size = min(cfg.accumulate, batches - group_start)
            is_step = i + 1 == group_start + group_size
            sync = contextlib.nullcontext()
            if self.dist.enabled and not is_step:
                sync = net.no_sync()  # type: ignore[operator]
            oom = oom_context("train", batch["slide_id"], batch["features"].shape[1],
                              **self._oom_kwargs())  # fmt: skip
            with sync, oom:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_on):
                    loss, logs = net(batch, criterion)
                if not torch.isfinite(loss):
                    raise MilkitError(
                        "training loss is not finite",
                        value=float(loss.detach()),
                        hint="Lower --lr, check features for NaN/inf, or enable --grad-clip",
                    )
                scaler.scale(loss / group_size).backward()
            n_seen += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if is_step:
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                model.on_train_step_end(global_step, total_steps)
            if hasattr(bar, "set_postfix") and i % 10 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / n_seen:.4f}", **self._last_val)
        _set_train_mode(loader.dataset, False)
        logs_out = {f"train_{k}" if k != "loss" else "train_loss": v / max(1, n_seen)
                    for k, v in sums.items()}  # fmt: skip
        logs_out["lr"] = optimizer.param_groups[0]["lr"]
        return logs_out, global_step

    def _oom_kwargs(self) -> dict[str, Any]:
        """What an out-of-memory message needs to name the remedy (``milkit.runtime.oom``)."""
        return {"model": self.model_name, "device": str(self.device),
                "batch_size": self.config.batch_size,
                "max_instances": self.config.max_instances,
                "where": self.out_dir.name if self.out_dir is not None else None}  # fmt: skip

    def _validate(self, model: nn.Module, val_ds: Dataset, criterion: nn.Module) -> dict:
        from milkit.training.metrics import epoch_metrics

        preds = predict(model, val_ds, batch_size=self.config.batch_size, device=self.device,
                        num_workers=self.config.num_workers, phase="validate",
                        oom_kwargs=self._oom_kwargs(),
                        threads=torch.get_num_threads())  # fmt: skip
        probs = torch.as_tensor(preds.probs).clamp_min(1e-12)
        y = torch.as_tensor(preds.labels, dtype=torch.long)
        loss = nn.functional.nll_loss(probs.log(), y).item()
        # val_auc (selection, saturation warnings) and val_accuracy; the test folds get the full
        # classification_metrics
        row = {"val_loss": loss}
        row.update({f"val_{k}": v for k, v in epoch_metrics(preds.labels, preds.probs).items()})
        return row

    # ------------------------------------------------------------------ logging
    def _progress(self, iterable, desc: str):
        if not (self.config.progress and self.dist.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

    def _tensorboard(self):
        if self.out_dir is None or not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _write_logs(
        self, history: list[dict[str, Any]], writer, rows: Sequence[dict[str, Any]]
    ) -> None:
        """Rewrite log.csv / log.jsonl from ``history``; add ``rows`` (new ones) to TensorBoard."""
        if self.out_dir is None:
            return
        keys: list[str] = []
        for r in history:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(history)
        atomic_write_text(self.out_dir / "log.csv", buf.getvalue())
        atomic_write_text(
            self.out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history)
        )
        if writer is not None:
            for row in rows:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, row["epoch"])


def fit_model(
    model: nn.Module,
    train_ds: Dataset,
    config: TrainConfig | None = None,
    val_ds: Dataset | None = None,
    out_dir: str | Path | None = None,
    **trainer_kwargs: Any,
) -> FitResult:
    """Train ``model`` in place (ends holding the best weights); see ``Trainer``."""
    return Trainer(model, config, out_dir, **trainer_kwargs).fit(train_ds, val_ds)


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    with_attention: bool = False,
    num_workers: int = 0,
    phase: str = "predict",
    oom_kwargs: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> Predictions:
    """Softmax probabilities for every bag of ``dataset`` (in dataset order), in eval mode.

    An out-of-memory error becomes a ``milkit.runtime.oom.BagOutOfMemoryError`` naming the slide(s), N
    and ``phase`` (``validate``/``test``/``predict``/``heatmap``) with that phase's remedy
    (``oom_kwargs``: ``model``, ``batch_size``, ``max_instances`` for its wording).

    ``attention`` (when requested) is one array per bag, trimmed of padding: shape (N,) or
    (H, N) for multi-head models; None for models that return no attention.

    ``threads``: torch intra-op threads for the pass (None: one for small bags, else torch's
    default; ``milkit.runtime.threads.choose_threads``); the previous setting is restored.
    """
    from milkit.runtime.threads import choose_threads

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(choose_threads(threads, dataset, batch_size=batch_size))
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate(),
                        num_workers=num_workers)  # fmt: skip
    ids: list[str] = []
    labels: list[int] = []
    probs: list[np.ndarray] = []
    attention: list[np.ndarray] | None = [] if with_attention else None
    try:
        for batch in loader:
            batch = _to_device(batch, dev)
            kw = {"model": getattr(model, "milkit_name", None) or type(model).__name__,
                  "device": str(dev),
                  "batch_size": batch_size,
                  **{k: v for k, v in (oom_kwargs or {}).items() if v is not None}}  # fmt: skip
            with oom_context(phase, batch["slide_id"], batch["features"].shape[1], **kw):
                out = model(batch["features"], mask=batch.get("mask"), coords=batch.get("coords"))
            probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
            ids.extend(str(s) for s in batch["slide_id"])
            labels.extend(int(v) for v in batch["label"].tolist())
            if attention is not None:
                att = out.attention
                if att is None:
                    attention = None
                    continue
                mask = batch.get("mask")
                for b in range(att.shape[0]):
                    n = int(mask[b].sum()) if mask is not None else att.shape[-1]
                    attention.append(att[b, ..., :n].float().cpu().numpy())
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    return Predictions(
        slide_ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        probs=np.concatenate(probs, axis=0) if probs else np.zeros((0, num_classes)),
        attention=attention,
    )
