"""SC-MIL — supervised contrastive learning for imbalanced MIL (Juyal et al., WACV 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILOutput, WrappedMIL
from milkit.models.layers.supcon import ProjectionHead, supcon_loss
from milkit.models.registry import create, normalise_name, register_aggregator

SCHEDULES = ("parabolic", "linear", "step")


def scmil_beta(progress: float, schedule: str = "parabolic", switch_at: float = 0.5) -> float:
    """Weight β of the SupCon term at training ``progress`` t/T ∈ [0, 1] (clipped).

    ``parabolic``: β = 1 − (t/T)² (BBN's cumulative-learning curve, Zhou et al. CVPR 2020);
    ``linear``: β = 1 − t/T; ``step``: β = 1 before ``switch_at``·T, then 0. All give β(0) = 1,
    β(1) = 0 and are non-increasing.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "parabolic":
        return 1.0 - t * t
    if schedule == "linear":
        return 1.0 - t
    if schedule == "step":
        return 1.0 if t < switch_at else 0.0
    raise ModelError(
        "scmil", "unknown schedule", value=schedule, hint=f"choose one of {list(SCHEDULES)}"
    )


@register_aggregator("scmil", description="SC-MIL: SupCon on bag embeddings + CE, any base model")
@register_aggregator(
    "scmil-abmil",
    description="SC-MIL on gated ABMIL (CLAM small config)",
    base="abmil-gated",
)
class SCMIL(WrappedMIL):
    """SC-MIL: supervised contrastive bag representations, curriculum towards the classifier.

    Paper: Juyal et al., "SC-MIL: Supervised Contrastive Multiple Instance Learning for Imbalanced
    Classification in Pathology", WACV 2024, arXiv 2303.13405. No official code exists (the
    GitHub repo ``sotiraslab/SC-MIL`` is a different paper, "Sparsely Coded MIL").

    Equations, for a batch of B bags with labels y_j and base aggregator f (bag embedding b):
        b_j = f(X_j),  ŷ_j = W b_j + c                  classifier on b (not on z)
        z_j = g(b_j) / ‖g(b_j)‖                          projection head g
        L_SupCon = (τ/0.07) · mean_i −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )
                   (mean over all B anchors, an anchor without a positive counting 0: the
                   reference SupConLoss of HobbitLong/SupContrast losses.py)
        L = β_t · L_SupCon + (1 − β_t) · L_CE,  β_t = 1 − (t/T)²

    From the paper (abstract, verified): SupCon on bag-level embeddings of an attention-MIL
    aggregator, trained jointly with the bag classifier, with a schedule that moves from
    representation learning to classifier learning. Our choices (the paper body could not be
    read; spec §6 "suggested defaults"): the parabolic schedule of BBN (linear and step
    selectable) over optimiser steps t of T; τ = 0.1; g = Linear(E→E) + ReLU + Linear(E→128) with
    L2 normalisation; the classifier uses b; SupCon normalised as the reference implementation
    (``milkit.models.layers.supcon.supcon_loss`` with ``normalization="reference"``; its
    ``"paper"`` form averages over the anchors that have a positive, without τ/0.07); batches of ≥ 8 bags with ≥ 2 per class from a class-balanced sampler
    (``training_preset``). When a batch has no positive pair (B = 1, or all labels distinct) the
    SupCon term is skipped and the loss is the base loss alone (weight 1, not 1 − β), logged as
    ``supcon_skipped = 1``. The base's own loss (``base.training_loss``: CE plus its auxiliary
    losses) plays the role of L_CE.

    Args:
        base: registered name of the attention aggregator (``scmil-abmil``: ``abmil-gated``).
        base_kwargs: overrides passed to ``models.create(base, ...)``.
        proj_hidden_dim: hidden width of g (default: the base's embedding size).
        proj_dim: output size of g (128).
        temperature: SupCon τ (0.1).
        schedule: ``parabolic`` | ``linear`` | ``step``.
        switch_at: for ``step``, the training fraction where β drops from 1 to 0.
    """

    # Our choice (no official code): Adam lr 2e-4, wd 1e-5 (the CLAM/ABMIL recipe of the base),
    # 8 bags per batch drawn by a class-balanced sampler so most batches hold >= 2 bags per class.
    training_preset: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "batch_size": 8,
        "sampling": "balanced",
    }

    beta: Tensor

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        base: str = "abmil-gated",
        base_kwargs: dict[str, Any] | None = None,
        proj_hidden_dim: int | None = None,  # our choice: the embedding size (e.g. 512)
        proj_dim: int = 128,  # our choice (SupCon, Khosla et al. 2020: 128-d projection)
        temperature: float = 0.1,  # our choice (Khosla et al. 2020 range)
        schedule: str = "parabolic",  # our choice (BBN cumulative learning)
        switch_at: float = 0.5,  # our choice, only for schedule="step"
    ) -> None:
        if schedule not in SCHEDULES:
            raise ModelError(
                "scmil", "unknown schedule", value=schedule, hint=f"choose one of {list(SCHEDULES)}"
            )
        if not temperature > 0:
            raise ModelError("scmil", "temperature must be > 0", value=temperature)
        if not 0.0 <= switch_at <= 1.0:
            raise ModelError("scmil", "switch_at must be in [0, 1]", value=switch_at)
        if normalise_name(base).startswith("scmil"):
            raise ModelError(
                "scmil",
                "the base is already an SC-MIL model",
                value=base,
                hint="give a plain aggregator such as abmil-gated",
            )
        base_model = create(base, in_dim, num_classes, **(base_kwargs or {}))
        embed_dim = getattr(base_model, "embed_dim", None)
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ModelError(
                "scmil",
                "the base model does not declare its embedding size (embed_dim)",
                value=base,
            )
        super().__init__(base_model, in_dim, num_classes)  # forward: the base's, embedding = b
        self.temperature, self.schedule, self.switch_at = float(temperature), schedule, switch_at
        self.projection = ProjectionHead(embed_dim, proj_hidden_dim or embed_dim, proj_dim)
        # β_t lives in the state dict so a resumed run continues the schedule
        self.register_buffer("beta", torch.tensor(scmil_beta(0.0, schedule, switch_at)))

    def project(self, embedding: Tensor) -> Tensor:
        """L2-normalised projection z = g(b)/‖g(b)‖ of bag embeddings (B, E) → (B, proj_dim)."""
        return self.projection(embedding)

    def training_loss(
        self, batch: dict[str, Any], output: MILOutput, criterion: nn.Module
    ) -> tuple[Tensor, dict[str, float]]:
        """``β·L_SupCon + (1 − β)·L_base``; the base loss alone when no bag has a positive."""
        base_loss, logs = super().training_loss(batch, output, criterion)
        z = self.project(output.embedding)
        supcon, n_anchors = supcon_loss(z, batch["label"], self.temperature)
        beta = float(self.beta)
        if n_anchors == 0:
            loss = base_loss + supcon  # supcon is an exact 0 kept in the graph
            logs["supcon_skipped"] = 1.0
        else:
            loss = beta * supcon + (1.0 - beta) * base_loss
            logs["supcon_skipped"] = 0.0
        logs.update(
            loss_supcon=float(supcon.detach()), scmil_beta=beta, supcon_anchors=float(n_anchors)
        )
        return loss, logs

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Set β for the next step; ``step`` = optimiser steps completed so far (1..T)."""
        super().on_train_step_end(step, total_steps)
        if total_steps > 0:
            progress = step / total_steps
            self.beta.fill_(scmil_beta(progress, self.schedule, self.switch_at))
