"""Supervised contrastive loss (SupCon) over bag embeddings and its projection head.

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (eq. 2, ``L^sup_out``), as used on
bag-level embeddings by SC-MIL (Juyal et al., WACV 2024). For L2-normalised projections z_i of the
B bags of a batch with labels y_i, ``P(i) = {p ≠ i : y_p = y_i}`` and ``A(i) = {a ≠ i}``:

    ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

Normalisation (``normalization``):

- ``"reference"`` (default): the reference implementation, HobbitLong/SupContrast ``losses.py``
  ``SupConLoss`` (contrast_mode "all", one view): an anchor without a positive contributes 0,
  the loss is the mean over ALL B anchors, scaled by τ / base_τ (``base_temperature`` 0.07):
  ``L = (τ/base_τ) · (1/B) Σ_{i: |P(i)|≥1} ℓ_i``. Equal to the reference to float rounding
  (``tests/models/test_fidelity.py``).
- ``"paper"``: eq. 2's ℓ_i averaged over the anchors for which it is defined (|P(i)| ≥ 1), no
  τ/base_τ factor (milkit's behaviour up to commit ab7cc23). The two agree when every anchor
  has a positive and τ = base_τ.
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


def supcon_loss(
    z: Tensor,
    labels: Tensor,
    temperature: float,
    *,
    base_temperature: float = 0.07,
    normalization: str = "reference",
) -> tuple[Tensor, int]:
    """SupCon loss of L2-normalised embeddings ``z`` (B, E) with integer ``labels`` (B,).

    Args:
        z: (B, E) L2-normalised projections; float16/bfloat16 are computed in float32,
            float32/float64 in their own dtype.
        labels: (B,) integer labels.
        temperature: τ > 0.
        base_temperature: base_τ of the reference's τ/base_τ factor (0.07 as the reference);
            unused for ``normalization="paper"``.
        normalization: ``"reference"`` (default) or ``"paper"`` (module docstring).

    Returns ``(loss, n_anchors)`` with ``n_anchors`` the number of anchors that have a positive.
    With none (B < 2, or all labels distinct) the loss is an exact zero that stays connected to
    ``z`` (so every parameter still receives a — zero — gradient), as the reference's.

    Raises:
        ValueError: wrong shapes, τ ≤ 0 or base_τ ≤ 0, unknown ``normalization``.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(
            f"supcon_loss: z must be (B, E) and labels (B,), got {tuple(z.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"supcon_loss: temperature must be > 0, got {temperature}")
    if base_temperature <= 0:
        raise ValueError(f"supcon_loss: base_temperature must be > 0, got {base_temperature}")
    if normalization not in ("reference", "paper"):
        raise ValueError(
            f"supcon_loss: normalization must be 'reference' or 'paper', got {normalization!r}"
        )
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positives.sum(dim=1)
    anchors = n_pos > 0
    n_anchors = int(anchors.sum())
    if n_anchors == 0:
        return z.sum() * 0.0, 0
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    sim = (zf @ zf.T) / temperature
    sim = sim.masked_fill(eye, float("-inf"))  # a ≠ i in the denominator
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~positives, 0.0)  # also removes the -inf diagonal
    mean_log_prob_pos = log_prob.sum(dim=1) / n_pos.clamp(min=1)
    if normalization == "paper":
        return -mean_log_prob_pos[anchors].mean(), n_anchors
    # Reference: anchors without a positive contribute 0 (their row sum is 0), mean over all B.
    return -(temperature / base_temperature) * mean_log_prob_pos.mean(), n_anchors
