"""Epoch selection: which epoch of a fit is kept, why, and what a fit carries between epochs.

Rules (``Trainer.fit``): ``val_loss`` keeps the lowest validation loss; ``val_auc`` the highest
AUC with ties to the lower loss; an undefined score never wins; warnings for small or saturated
validation sets. ``FitState`` is what ``last.pt`` stores to resume a fit exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from milkit.io.checkpoint import plain

# Below this many validation slides epoch selection is noisy (a warning says so): the AUC of
# p positive and n negative slides takes at most p * n + 1 values, and one slide moves the loss.
MIN_VAL_SLIDES = 10


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def selection_key(row: Mapping[str, Any], monitor: str) -> tuple[float, ...] | None:
    """Rank of one epoch's validation row (larger is better); None when the score is undefined.

    ``val_loss``: ``(-loss,)``. ``val_auc``: ``(auc, -loss)``, so epochs with equal AUC (common:
    a small validation set's AUC saturates at 1.0) are told apart by the lower loss.
    """
    loss = finite_or_none(row.get("val_loss"))
    if monitor == "val_loss":
        return None if loss is None else (-loss,)
    auc = finite_or_none(row.get(monitor))
    if auc is None:
        return None
    return (auc, -loss if loss is not None else -math.inf)


def describe_selection(
    history: Sequence[Mapping[str, Any]],
    epoch: int,
    monitor: str,
    requested: str,
    val_ds: Dataset | None,
) -> dict[str, Any]:
    """``{"epoch", "monitor", "requested_monitor", "score", "val_loss", "reason"}``."""
    row = next((r for r in history if r.get("epoch") == epoch), {})
    score, loss = finite_or_none(row.get(monitor)), finite_or_none(row.get("val_loss"))
    if val_ds is None:
        reason = "no validation set: the last epoch is kept"
    elif score is None:
        reason = f"no epoch had a finite {monitor}: the last epoch is kept"
    elif monitor == "val_loss":
        reason = f"lowest val_loss ({score:.4f}) of {len(history)} epochs"
    else:
        tied = sum(1 for r in history if finite_or_none(r.get(monitor)) == score)
        reason = f"highest {monitor} ({score:.4f}) of {len(history)} epochs"
        if tied > 1 and loss is not None:
            reason += f"; {tied} epochs tied, the lowest val_loss ({loss:.4f}) won"
    if monitor != requested:
        reason += f" ({requested} was undefined on this validation set)"
    return {"epoch": epoch, "monitor": monitor, "requested_monitor": requested, "score": score,
            "val_loss": loss, "reason": reason}  # fmt: skip


def saturation_notes(history: Sequence[Mapping[str, Any]], monitor: str) -> list[str]:
    """A warning when the validation AUC sits at 1.0 for several epochs (it cannot rank them)."""
    perfect = [int(r["epoch"]) for r in history if finite_or_none(r.get("val_auc")) == 1.0]
    if len(perfect) < 2:
        return []
    note = (
        f"validation AUC saturated at 1.0 in {len(perfect)} of {len(history)} epochs (first: "
        f"epoch {perfect[0]}); the validation set is too small or too easy to rank epochs by AUC"
    )
    if monitor == "val_auc":
        note += ", ties were broken by val_loss"
    return [note]


@dataclass
class FitState:
    """What a fit carries from epoch to epoch, and what ``last.pt`` stores to resume it exactly.

    ``monitor`` is the selection score actually used (``val_loss`` when ``val_auc`` is undefined
    on the validation set); ``best_key`` ranks epochs (``_selection_key``); ``best_state`` holds
    the kept epoch's weights (on the model's device), written to ``best.pt``.
    """

    monitor: str
    start_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    best_key: tuple[float, ...] | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None

    @classmethod
    def resumed(cls, saved: Mapping[str, Any], monitor: str) -> FitState:
        """The state after the epoch a ``last.pt`` was written at (``best_state`` left unset)."""
        st = cls(
            monitor=saved.get("monitor", monitor),
            start_epoch=int(saved["epoch"]) + 1,
            global_step=int(saved["global_step"]),
            best_score=saved["best_score"],
            best_epoch=int(saved["best_epoch"]),
            bad_epochs=int(saved["bad_epochs"]),
            stopped=bool(saved["stopped"]),
            history=list(saved["history"]),
        )
        key = saved.get("best_key")
        if key is not None:
            st.best_key = tuple(float(v) for v in key)
        elif 0 <= st.best_epoch < len(st.history):  # a state written before best_key existed
            st.best_key = selection_key(st.history[st.best_epoch], st.monitor)
        return st

    def keep(
        self, epoch: int, score: float | None, key: tuple[float, ...] | None, model: nn.Module
    ) -> None:
        """Select ``epoch``: its score and ranking key, a copy of the model's weights."""
        self.best_epoch, self.best_score, self.best_key, self.bad_epochs = epoch, score, key, 0
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def saved(self) -> dict[str, Any]:
        """The ``last.pt`` fields of this state (plain values; weights are saved separately)."""
        return {
            "global_step": self.global_step,
            "best_score": self.best_score,
            "best_key": None if self.best_key is None else list(self.best_key),
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "monitor": self.monitor,
            "history": plain(self.history),
        }
