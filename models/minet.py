"""MIL-respecting reference aggregators: ``mi-net`` and ``threshold-mil``.

Both pool *instance scores* with a max over instances and combine them monotonically, so adding an
instance can never lower the positive-class score (the standard / threshold MIL assumption;
Raff & Holt, NeurIPS 2023). They are the controls of ``milkit check``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.registry import register_aggregator


def _masked_max(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Max over instances (dim 1) of ``scores`` (B, N, K), ignoring padding; values and argmax."""
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
    return scores.max(dim=1)


def _instance_mlp(in_dim: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _binary_logits(score: Tensor) -> Tensor:
    """Two-class logits ``[0, s]``: softmax gives p(positive) = sigmoid(s), monotone in s."""
    return torch.stack([torch.zeros_like(score), score], dim=-1)


@register_aggregator("mi-net", description="mi-Net: instance MLP, max over instance scores")
class MiNet(MILModel):
    """mi-Net (Wang, Yan, Tang, Bai, Liu, "Revisiting multiple instance neural networks",
    Pattern Recognition 74, 2018); official code https://github.com/yanyongluan/MINNs
    (``mi_Net.py``, ``mil_nets/layer.py::Score_pooling``).

    Equations: h_i = MLP(x_i) (FC 256-128-64, ReLU, dropout 0.5 after the last layer);
    instance score p_i = sigmoid(w^T h_i + b); bag score P = max_i p_i (max MIL pooling).

    Contract mapping. For C = 2 the logits are ``[0, s]`` with s = max_i (w^T h_i + b), so
    softmax(logits)[1] = sigmoid(s) = max_i p_i exactly (sigmoid is increasing); the positive
    score is monotone non-decreasing in the bag. For C > 2 (not in the paper) each class has its
    own instance logit and the bag logit is the per-class max; each class logit is then monotone
    in the bag, but its softmax share is not (another class can rise too).
    ``instance_logits`` are ``[0, f_i]`` (C = 2) or the per-class instance logits; ``embedding``
    is the pooled score vector (B, 1) or (B, C); ``attention`` is None.

    Departures: the official optimiser (SGD, lr 5e-4, Nesterov momentum 0.9, L2 0.005, 50
    epochs) is not expressible in ``TrainConfig`` (adam/adamw only), so ``training_preset`` is
    empty; ``hidden`` and ``dropout`` are parameters so the assumption checks can shrink them.
    """

    model_name = "mi-net"

    permutation_invariant = True
    mil_respecting = True
    supports_padding = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden: tuple[int, ...] = (256, 128, 64),  # mi_Net.py: Dense 256, 128, 64
        dropout: float = 0.5,  # mi_Net.py: Dropout(rate=0.5) after fc3
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        hidden = tuple(int(h) for h in hidden)
        self.instance_net = _instance_mlp(in_dim, hidden, dropout)
        width = hidden[-1] if hidden else in_dim
        self.head = nn.Linear(width, 1 if num_classes == 2 else num_classes)
        self.embed_dim = self.head.out_features

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, 1 if num_classes == 2 else num_classes).to(
            self.head.weight.device
        )
        self.num_classes = num_classes
        self.embed_dim = self.head.out_features

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        scores = self.head(self.instance_net(x))  # (B, N, 1 | C)
        pooled, _ = _masked_max(scores, mask)  # (B, 1 | C)
        if self.num_classes == 2:
            logits = _binary_logits(pooled[:, 0])
            inst = _binary_logits(scores[..., 0])
        else:
            logits, inst = pooled, scores
        if mask is not None:
            inst = inst * mask.unsqueeze(-1).to(inst.dtype)
        return MILOutput(logits=logits, embedding=pooled, instance_logits=inst)


@register_aggregator(
    "threshold-mil",
    description="threshold/presence MIL: max-pooled competing concept detectors, noisy-AND",
)
class ThresholdMIL(MILModel):
    """Threshold-MIL reference model (ours; milkit's MIL-respecting control for generalized MIL).

    Assumption: presence-/threshold-based generalized MIL (Weidmann, Frank & Pfahringer, ECML
    2003): a bag is positive iff every required concept c ∈ Ĉ is present. Motivated by Raff & Holt,
    "Reproducibility in Multiple Instance Learning: A Case For Algorithmic Unit Tests", NeurIPS
    2023 (arXiv 2310.17867; no official code). There is no official repository: this model is
    milkit's own control, not a paper reproduction.

    Equations (K concepts; W = last hidden width):
        h_i = MLP(x_i)                                  instance embedding (ReLU, ``hidden``)
        log p_ik = log_softmax(U h_i + u)_k, k ≤ K      concept k of K + 1 ("none" is the last)
        z_k = max_i log p_ik                            log presence of concept k in the bag
        s   = b + Σ_k softplus(w_k) · z_k               weighted noisy-AND (log of Π_k P_k^w_k)
    Each instance's p_ik depends on that instance only, z_k ≤ 0 is a max over instances and the
    weights are non-negative: adding an instance never lowers s (monotone in the bag). Because
    z_k ≤ 0, inflating one concept can raise s by at most its own share; the other required
    concepts still bound it (T3). A concept with weight → 0 is ignored, so the model covers
    standard MIL (one required concept) and "A and B" (two).

    Why competing (softmax) detectors: with independent sigmoid detectors (``detector=
    "sigmoid"``: log p_ik = log σ(U h_i + u)_k) on a ReLU MLP, which is nearly positively
    homogeneous, every detector prefers the larger of two collinear concepts (T2/T3 use
    A = N(2·1, 0.1) and B = N(3·1, 0.1)); in our runs all of them became "B" and training stalled
    at AUC 0.75. The softmax makes an instance belong to one concept, so detectors specialise;
    with K = 6 every seed we tried fitted T2 and T3 (K = 4 stalled on one of three T2 seeds).

    Contract: C = 2 logits ``[0, s]`` (softmax p(positive) = σ(s)). C > 2: one (w, b) row per
    class; each class logit is monotone (softmax shares are not, see ``MiNet``).
    ``instance_logits``: the same combination of the instance's own log p_ik (B, N, C).
    ``embedding``: z (B, K). ``attention``: None.
    """

    model_name = "threshold-mil"

    permutation_invariant = True
    mil_respecting = True
    supports_padding = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        num_concepts: int = 6,  # ours: see the class docstring
        hidden: tuple[int, ...] = (128, 64),  # ours: a small instance MLP
        dropout: float = 0.0,
        detector: str = "softmax",  # ours: "softmax" (competing) | "sigmoid" (independent)
    ) -> None:
        super().__init__()
        if num_concepts < 1:
            raise ModelError("threshold-mil", "num_concepts must be >= 1", value=num_concepts)
        if detector not in ("softmax", "sigmoid"):
            raise ModelError(
                "threshold-mil", "detector must be 'softmax' or 'sigmoid'", value=detector
            )
        self.in_dim, self.num_classes = in_dim, num_classes
        self.num_concepts, self.detector = int(num_concepts), detector
        hidden = tuple(int(h) for h in hidden)
        self.instance_net = _instance_mlp(in_dim, hidden, dropout)
        width = hidden[-1] if hidden else in_dim
        extra = 1 if detector == "softmax" else 0  # the "none" class
        self.concepts = nn.Linear(width, self.num_concepts + extra)
        n_out = 1 if num_classes == 2 else num_classes
        # softplus(0.5413) = 1: every concept starts with unit weight (ours).
        self.raw_weight = nn.Parameter(torch.full((n_out, self.num_concepts), 0.5413))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.embed_dim = self.num_concepts

    def reset_classifier(self, num_classes: int) -> None:
        n_out = 1 if num_classes == 2 else num_classes
        device = self.bias.device
        self.raw_weight = nn.Parameter(
            torch.full((n_out, self.num_concepts), 0.5413, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(n_out, device=device))
        self.num_classes = num_classes

    def concept_log_probs(self, x: Tensor) -> Tensor:
        """log p_ik (..., N, K) of every instance, each ≤ 0."""
        u = self.concepts(self.instance_net(x))
        if self.detector == "softmax":
            return torch.log_softmax(u, dim=-1)[..., : self.num_concepts]
        return F.logsigmoid(u)

    def combine(self, logp: Tensor) -> Tensor:
        """Monotone noisy-AND of concept log-presences (..., K) → class scores (..., 1 | C)."""
        return logp @ F.softplus(self.raw_weight).T + self.bias

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        logp = self.concept_log_probs(x)  # (B, N, K)
        z, _ = _masked_max(logp, mask)  # (B, K)
        scores = self.combine(z)  # (B, 1 | C)
        inst_scores = self.combine(logp)  # (B, N, 1 | C)
        if self.num_classes == 2:
            logits = _binary_logits(scores[:, 0])
            inst = _binary_logits(inst_scores[..., 0])
        else:
            logits, inst = scores, inst_scores
        if mask is not None:
            inst = inst * mask.unsqueeze(-1).to(inst.dtype)
        return MILOutput(logits=logits, embedding=z, instance_logits=inst)
