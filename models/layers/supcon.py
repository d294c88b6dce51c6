"""Supervised contrastive loss (SupCon) over bag embeddings and its projection head.

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (eq. 2, ``L^sup_out``), as used on
bag-level embeddings by SC-MIL (Juyal et al., WACV 2024). For L2-normalised projections z_i of the
B bags of a batch with labels y_i, ``P(i) = {p ≠ i : y_p = y_i}`` and ``A(i) = {a ≠ i}``:

    ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )
    L   = mean of ℓ_i over the anchors with |P(i)| ≥ 1

Averaging over anchors (instead of the paper's plain sum) follows the reference implementation
(HobbitLong/SupContrast) and keeps the scale independent of the batch size. The reference code's
extra factor τ / base_τ (base 0.07) is not applied: it only rescales the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Two-layer MLP ``Linear → ReLU → Linear`` followed by L2 normalisation: ``z = g(b)/‖g(b)‖``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, b: Tensor) -> Tensor:
        return F.normalize(self.net(b), dim=-1)


def supcon_loss(z: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, int]:
    """SupCon loss of L2-normalised embeddings ``z`` (B, E) with integer ``labels`` (B,).

    Returns ``(loss, n_anchors)``. With no anchor that has a positive (B < 2, or all labels
    distinct) the loss is an exact zero that stays connected to ``z`` (so every parameter still
    receives a — zero — gradient) and ``n_anchors`` is 0.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(
            f"supcon_loss: z must be (B, E) and labels (B,), got {tuple(z.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"supcon_loss: temperature must be > 0, got {temperature}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positives.sum(dim=1)
    anchors = n_pos > 0
    n_anchors = int(anchors.sum())
    if n_anchors == 0:
        return z.sum() * 0.0, 0
    zf = z.float()
    sim = (zf @ zf.T) / temperature
    sim = sim.masked_fill(eye, float("-inf"))  # a ≠ i in the denominator
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~positives, 0.0)  # also removes the -inf diagonal
    mean_log_prob_pos = log_prob.sum(dim=1) / n_pos.clamp(min=1)
    return -mean_log_prob_pos[anchors].mean(), n_anchors
