"""Run any milkit aggregator under torchmil (https://github.com/Franblueee/torchmil).

torchmil's models implement ``forward(X, mask)``, ``compute_loss(Y, X, mask) -> (Y_pred,
loss_dict)`` and ``predict(X, mask, return_inst_pred)``; its ``Trainer`` wraps the model in
``MILModelWrapper``, which passes the batch keys whose names match those arguments, and adds up
every entry of ``loss_dict`` (torchmil ``models/mil_model.py``, ``utils/trainer.py``, v1.0.2).

``TorchmilAdapter`` maps that interface onto milkit's (``models/base.py``):

- binary models (``num_classes == 2``) return torchmil's one logit per bag, the log-odds of
  class 1, ``logits[:, 1] - logits[:, 0]``: ``sigmoid`` of it is exactly milkit's softmax
  probability of class 1, so torchmil's binary metrics and ``BCEWithLogitsLoss`` convention apply;
  multi-class models return (B, C) logits;
- the loss is the model's own ``training_loss`` (cross-entropy plus the model's auxiliary losses,
  e.g. CLAM's instance loss or SC-MIL's SupCon term), as one ``loss_dict`` entry so torchmil's
  sum is milkit's loss;
- models that update state after each optimiser step (MHIM-MIL's EMA teacher, AEM, SC-MIL's β
  schedule) need ``attach_optimizer(optimizer, total_steps)``; without it ``compute_loss`` refuses
  to train them rather than silently train a different model.

Example::

    from milkit import models
    from milkit.interop.torchmil import TorchmilAdapter
    from torchmil.utils.trainer import Trainer

    model = TorchmilAdapter(models.create("abmil", in_dim=1024, num_classes=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    Trainer(model, optimizer, device="cpu").train(20, train_loader, val_loader)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

try:
    from torchmil.models import MILModel as _TorchmilModel
except ImportError as err:  # pragma: no cover - exercised only without torchmil
    raise ImportError(
        "milkit.interop.torchmil needs torchmil: pip install 'milkit[interop]' "
        "(or pip install torchmil)"
    ) from err

from milkit.models.base import MILModel, MILOutput

__all__ = ["TorchmilAdapter"]


class TorchmilAdapter(_TorchmilModel):
    """A milkit ``MILModel`` behind torchmil's ``MILModel`` interface.

    Args:
        model: any milkit aggregator (``milkit.models.create(...)``).
        criterion: bag loss on (B, C) logits and integer labels; default ``nn.CrossEntropyLoss()``
            (what ``milkit train`` uses without class weights).

    Shapes: ``X`` (B, N, D) float; ``mask`` (B, N), 1/True = real instance (torchmil's
    ``collate_fn`` pads and builds it); ``coords`` (B, N, 2) level-0 pixel coordinates, only for
    models that use positions; ``Y`` (B,) or (B, 1) integer class indices (0./1. floats allowed).
    """

    def __init__(self, model: MILModel, criterion: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(model, MILModel):
            raise TypeError(
                f"TorchmilAdapter wraps a milkit MILModel, got {type(model).__name__}; "
                "build one with milkit.models.create(name, in_dim, num_classes)"
            )
        self.model = model
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.num_classes = int(model.num_classes)
        self._steps_done = 0
        self._total_steps: int | None = None
        self._hook: Any = None

    # ------------------------------------------------------------------ torchmil interface
    def forward(
        self, X: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> Tensor:
        """Bag logits: (B,) log-odds of class 1 for binary models, else (B, C)."""
        return self._bag_logits(self._run(X, mask, coords))

    def compute_loss(
        self, Y: Tensor, X: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(Y_pred, {"<model>_loss": loss})`` with the model's own ``training_loss``.

        Raises:
            RuntimeError: training a model with per-step updates before ``attach_optimizer``.
            ValueError: labels that are not class indices in ``[0, num_classes)``.
        """
        if self.training and self._needs_step_hook() and self._hook is None:
            raise RuntimeError(
                f"{type(self.model).__name__} updates itself after every optimiser step "
                "(on_train_step_end); call adapter.attach_optimizer(optimizer, total_steps) "
                "before torchmil's Trainer.train"
            )
        labels = self._labels(Y)
        mask_b = None if mask is None else mask.to(torch.bool)
        output = self._run(X, mask_b, coords)
        batch = {"features": X, "mask": mask_b, "coords": coords, "label": labels}
        loss, _ = self.model.training_loss(batch, output, self.criterion)
        return self._bag_logits(output), {f"{type(self.model).__name__}_loss": loss}

    def predict(
        self,
        X: Tensor,
        mask: Tensor | None = None,
        coords: Tensor | None = None,
        return_inst_pred: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Bag logits as ``forward``; with ``return_inst_pred`` also (B, N) instance scores.

        Instance scores are the model's instance logits (binary: log-odds of class 1; multi-class:
        the logit of the predicted bag class) when it has them, otherwise its attention (mean over
        heads), 0 at padding.

        Raises:
            ValueError: ``return_inst_pred`` for a model with neither (e.g. mean pooling).
        """
        output = self._run(X, mask, coords)
        bag = self._bag_logits(output)
        if not return_inst_pred:
            return bag
        return bag, self._instance_scores(output, bag)

    # ------------------------------------------------------------------ per-step updates
    def attach_optimizer(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Call ``model.on_train_step_end(step, total_steps)`` after each ``optimizer.step()``.

        ``total_steps`` = epochs × batches per epoch (the schedules of MHIM-MIL, AEM and SC-MIL
        depend on it, as in ``milkit train``).
        """
        if self._hook is not None:
            self._hook.remove()
        self._total_steps = int(total_steps)
        self._steps_done = 0

        def after_step(*_: Any) -> None:
            self._steps_done += 1
            self.model.on_train_step_end(self._steps_done, self._total_steps or 0)

        self._hook = optimizer.register_step_post_hook(after_step)

    # ------------------------------------------------------------------ helpers
    def _needs_step_hook(self) -> bool:
        return type(self.model).on_train_step_end is not MILModel.on_train_step_end

    def _run(self, X: Tensor, mask: Tensor | None, coords: Tensor | None) -> MILOutput:
        mask_b = None if mask is None else mask.to(torch.bool)
        return self.model(X, mask=mask_b, coords=coords)

    def _bag_logits(self, output: MILOutput) -> Tensor:
        logits = output.logits
        if self.num_classes == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def _labels(self, Y: Tensor) -> Tensor:
        y = Y.reshape(-1)
        if y.is_floating_point() and not bool(torch.all(y == y.round())):
            raise ValueError(
                f"TorchmilAdapter: labels must be class indices, got non-integer values {y}"
            )
        y = y.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"TorchmilAdapter: labels must be in [0, {self.num_classes}), got {y.tolist()}"
            )
        return y

    def _instance_scores(self, output: MILOutput, bag: Tensor) -> Tensor:
        if output.instance_logits is not None:
            inst = output.instance_logits  # (B, N, C)
            if self.num_classes == 2:
                return inst[..., 1] - inst[..., 0]
            cls = bag.argmax(dim=-1)
            return inst.gather(2, cls[:, None, None].expand(-1, inst.shape[1], 1)).squeeze(2)
        if output.attention is not None:
            att = output.attention
            return att.mean(dim=1) if att.ndim == 3 else att
        raise ValueError(
            f"{type(self.model).__name__} gives neither instance logits nor attention; "
            "call predict(..., return_inst_pred=False)"
        )
