"""The single aggregator contract (docs/architecture.md §6): ``MILOutput`` and the ``MILModel`` base class.

Batch dictionary (what the trainer passes to the hooks and what collate produces):
    ``features`` (B, N, D) float, ``mask`` (B, N) bool (True = real instance) or None,
    ``coords`` (B, N, 2) int64 or None, ``label`` (B,) int64, ``slide_id`` list[str].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from milkit.errors import ModelError


@dataclass(frozen=True)
class MILOutput:
    """What every aggregator returns; always the same fields.

    Attributes:
        logits: (B, C) class logits (softmax / cross-entropy; binary tasks have C = 2).
        embedding: (B, E) bag embedding fed to the classifier head.
        attention: (B, N) or (B, H, N) normalised instance weights, 0 at padding; None if the
            model has no instance weighting.
        attention_logits: pre-softmax attention, same shape as ``attention``.
        instance_logits: (B, N, C) per-instance class logits, or None.
        aux_losses: extra training losses, already weighted; the trainer adds them to the loss.
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    attention_logits: Tensor | None = None
    instance_logits: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class of every aggregator.

    Subclasses set ``in_dim``, ``num_classes`` and ``embed_dim`` and implement ``forward``.
    Class attributes describe properties the contract suite and the assumption checks test:

    - ``permutation_invariant``: the output does not depend on instance order.
    - ``mil_respecting``: the model provably keeps the standard (or threshold) MIL assumption,
      i.e. adding an instance can never lower the positive-class score.
    - ``supports_padding``: padded batches with a mask give per-bag results; otherwise the model
      raises a clear error for B > 1.
    - ``training_preset``: the official training recipe of the paper's code, as keyword values of
      ``milkit.training.config.TrainConfig`` (e.g. ``{"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5,
      "epochs": 200, "scheduler": "cosine", "batch_size": 1}``); the trainer's ``--preset official``
      uses it. Empty means "use the trainer's defaults".
    """

    # The name in error messages (milkit.errors.ModelError): the class's registered name;
    # ``models.create`` sets the name the model was built under (``abmil-gated``, ...).
    model_name: str = "mil-model"
    permutation_invariant: ClassVar[bool] = True
    mil_respecting: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    training_preset: ClassVar[dict[str, Any]] = {}

    in_dim: int
    num_classes: int
    embed_dim: int

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_loss(
        self, batch: dict[str, Any], output: MILOutput, criterion: nn.Module
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss to minimise for one batch; default: criterion(logits, y) + Σ aux_losses."""
        loss = criterion(output.logits, batch["label"])
        logs = {"loss_ce": float(loss.detach())}
        for name, value in output.aux_losses.items():
            loss = loss + value
            logs[name] = float(value.detach())
        return loss, logs

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (EMA teachers, schedules). Default: nothing."""

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier head (attribute ``head``) for a new number of classes."""
        head = getattr(self, "head", None)
        if not isinstance(head, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} has no linear 'head' to reset")
        self.head = nn.Linear(head.in_features, num_classes).to(head.weight.device)
        self.num_classes = num_classes


class WrappedMIL(MILModel):
    """A model built around another aggregator, ``self.base`` (AEM's plug-in mode, SC-MIL).

    The forward pass is the base's; the trainer's hooks (``training_loss``,
    ``on_train_step_end``) and ``reset_classifier`` reach the base, and the base's order, padding
    and MIL properties are copied, so the contract suite and the assumption checks see the
    wrapped model's own. Subclasses override what they add (a loss term, a schedule) and call
    these to keep the base's behaviour.

    Args:
        base: the built aggregator (``models.create(name, in_dim, num_classes, ...)``).
        in_dim, num_classes: as passed to the base.
    """

    def __init__(self, base: MILModel, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.base = base
        self.in_dim, self.num_classes = in_dim, num_classes
        self.embed_dim = int(getattr(base, "embed_dim", 0) or 0)
        for flag in ("permutation_invariant", "mil_respecting", "supports_padding"):
            setattr(self, flag, bool(getattr(base, flag, getattr(MILModel, flag))))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        """The base's output unchanged (the input is checked under the wrapper's name first)."""
        check_bag_input(x, mask, model=self.model_name)
        return self.base(x, mask, coords)

    def training_loss(
        self, batch: dict[str, Any], output: MILOutput, criterion: nn.Module
    ) -> tuple[Tensor, dict[str, float]]:
        return self.base.training_loss(batch, output, criterion)

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        self.base.on_train_step_end(step, total_steps)

    def reset_classifier(self, num_classes: int) -> None:
        self.base.reset_classifier(num_classes)
        self.num_classes = num_classes


def check_bag_input(x: Tensor, mask: Tensor | None, *, model: str) -> Tensor | None:
    """Validate ``(x, mask)`` at the model boundary; return the mask as bool (or None).

    Raises ``milkit.errors.ModelError`` (a ValueError) with the model's name for a wrong rank or shape, and for a bag
    whose instances are all masked (it would otherwise produce NaN).
    """
    if x.ndim != 3:
        raise ModelError(model, "x must have shape (B, N, D)", value=tuple(x.shape))
    if x.shape[1] == 0:
        raise ModelError(model, "empty bag (N = 0); a bag needs at least one instance")
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise ModelError(model, f"mask must have shape (B, N) = {tuple(x.shape[:2])}",
                         value=tuple(mask.shape))  # fmt: skip
    mask = mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ModelError(model, f"bag(s) {rows} are fully masked; every bag needs an instance")
    return mask
