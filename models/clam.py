"""CLAM-SB and CLAM-MB: attention MIL with instance-level clustering (Lu et al. 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.layers.masking import masked_softmax
from milkit.models.registry import register_aggregator

# CLAM size_dict: "small" = [embed_dim, 512, 256], "big" = [embed_dim, 512, 384].
SIZES: dict[str, tuple[int, int]] = {"small": (512, 256), "big": (512, 384)}
INSTANCE_LOSSES = ("svm", "ce")
SMALL_BAG_POLICIES = ("clip", "skip", "error")

# CLAM main.py (README commands): --drop_out 0.25 --early_stopping --lr 2e-4 --weighted_sample
# --bag_loss ce --inst_loss svm; argparse defaults --reg 1e-5, --max_epochs 200, --opt adam;
# core_utils.EarlyStopping(patience=20, stop_epoch=50) on the validation (bag) loss, which may stop
# once `epoch > 50` with 0-based epochs, i.e. after the 52nd epoch (milkit: epoch + 1 >= 52).
# No LR scheduler; batch = 1 bag. The one copy of CLAM's recipe: ABMIL's CLAM layout uses it too.
CLAM_RECIPE: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 2e-4,
    "weight_decay": 1e-5,
    "epochs": 200,
    "scheduler": "none",
    "batch_size": 1,
    "sampling": "balanced",
    "patience": 20,
    "min_epochs": 52,
    "monitor": "val_loss",
}


def smooth_top1_svm_loss(
    scores: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    tau: float = 1.0,
    thresh: float = 1e3,
) -> Tensor:
    """Smooth top-1 multiclass SVM loss, averaged over samples (CLAM's ``--inst_loss svm``).

    Berrada, Zisserman, Kumar, "Smooth Loss Functions for Deep Top-k Classification", ICLR 2018;
    CLAM uses ``topk.svm.SmoothTop1SVM(n_classes=2)`` of github.com/oval-group/smooth-topk
    (α = 1, τ = 1, thresh = 1000), written here from its equations::

        x_j   = α·[j ≠ y] + s_j − s_y
        L_τ   = τ · log Σ_j exp(x_j / τ)              (smooth, Eq. 10 for k = 1)
        L_hard = max_j x_j                             (the Crammer-Singer hinge)

    A sample whose largest score exceeds its second largest by at least τ·log(thresh) uses
    ``L_hard`` (the library's ``detect_large`` switch, which keeps the log-sum-exp out of its
    flat, numerically useless region); every other sample uses ``L_τ``. The loss is the mean over
    samples.

    Args:
        scores: (S, C) class scores, C ≥ 2.
        target: (S,) int64 class indices.
    Returns:
        Scalar tensor (0-d).
    Raises:
        ValueError: ``scores`` not 2-D with C ≥ 2, or ``target`` of another length.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"smooth_top1_svm_loss: scores must be (S, C >= 2), got {tuple(scores.shape)}"
        )
    if target.shape != scores.shape[:1]:
        raise ValueError(
            f"smooth_top1_svm_loss: target must have shape ({scores.shape[0]},), "
            f"got {tuple(target.shape)}"
        )
    classes = torch.arange(scores.shape[1], device=scores.device)
    delta = alpha * (classes[None, :] != target[:, None]).to(scores.dtype)
    x = scores + delta - scores.gather(1, target[:, None])
    top2 = scores.detach().topk(2, dim=1).values
    hard = (top2[:, 0] - top2[:, 1]) >= tau * math.log(thresh)
    smooth = tau * torch.logsumexp(x / tau, dim=1)
    return torch.where(hard, x.max(dim=1).values, smooth).mean()


class _GatedAttention(nn.Module):
    """CLAM ``Attn_Net_Gated`` (parameter names kept): ``c(tanh(a h) ⊙ sigmoid(b h))``."""

    def __init__(self, dim: int, attn_dim: int, dropout: float, branches: int) -> None:
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), *drop)
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), *drop)
        self.attention_c = nn.Linear(attn_dim, branches)

    def forward(self, h: Tensor) -> Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class _PlainAttention(nn.Module):
    """CLAM ``Attn_Net`` (parameter names kept): ``Linear, Tanh, [Dropout], Linear``."""

    def __init__(self, dim: int, attn_dim: int, dropout: float, branches: int) -> None:
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.module = nn.Sequential(
            nn.Linear(dim, attn_dim), nn.Tanh(), *drop, nn.Linear(attn_dim, branches)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.module(h)


class _CLAM(MILModel):
    """Shared implementation of CLAM-SB / CLAM-MB (see the registered classes' docstrings)."""

    permutation_invariant: ClassVar[bool] = True
    mil_respecting: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    training_preset: ClassVar[dict[str, Any]] = CLAM_RECIPE
    multi_branch: ClassVar[bool] = False
    model_name: ClassVar[str] = "clam"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        gate: bool = True,  # CLAM_SB(gate=True)
        size: str = "small",  # --model_size small
        dropout: float = 0.25,  # main.py --drop_out 0.25 (the module's own default is 0.)
        attn_dropout: float | None = None,
        k_sample: int = 8,  # --B 8
        inst_loss: str = "svm",  # README commands: --inst_loss svm (argparse default: ce)
        bag_weight: float = 0.7,  # --bag_weight 0.7
        subtyping: bool = False,  # --subtyping (required by main.py for the subtyping task)
        inst_cluster: bool = True,  # --no_inst_cluster turns it off
        small_bags: str = "clip",  # our choice; the official code raises (see docstring)
    ) -> None:
        super().__init__()
        name = self.model_name
        if size not in SIZES:
            raise ModelError(name, "unknown size", value=size, hint=f"use one of {list(SIZES)}")
        if inst_loss not in INSTANCE_LOSSES:
            raise ModelError(
                name, "unknown inst_loss", value=inst_loss, hint=f"use {list(INSTANCE_LOSSES)}"
            )
        if small_bags not in SMALL_BAG_POLICIES:
            raise ModelError(
                name,
                "unknown small_bags policy",
                value=small_bags,
                hint=f"use one of {list(SMALL_BAG_POLICIES)}",
            )
        if int(k_sample) < 1:
            raise ModelError(name, "k_sample must be >= 1", value=k_sample)
        if not 0.0 <= bag_weight <= 1.0:
            raise ModelError(name, "bag_weight must be in [0, 1]", value=bag_weight)
        self.in_dim, self.num_classes = in_dim, num_classes
        self.gate, self.size, self.k_sample = bool(gate), size, int(k_sample)
        self.inst_loss, self.bag_weight = inst_loss, float(bag_weight)
        self.subtyping, self.inst_cluster, self.small_bags = (
            bool(subtyping),
            inst_cluster,
            small_bags,
        )
        hidden, attn_dim = SIZES[size]
        # Attn_Net(_Gated)(dropout=dropout): `if dropout:` appends Dropout(0.25), whatever p is.
        self.attn_dropout = (0.25 if dropout > 0 else 0.0) if attn_dropout is None else attn_dropout
        self.hidden = hidden
        branches = num_classes if self.multi_branch else 1
        # Same modules, creation order and names as the official attention_net, so state dicts
        # match and a fixed seed draws the same initial weights (CLAM uses PyTorch's default
        # init since 2024-04, commit d613a3d; before, Xavier-normal). ReLU in place: no extra
        # (N, 512) copy.
        fc = nn.Linear(in_dim, hidden)
        attention = (_GatedAttention if gate else _PlainAttention)(
            hidden, attn_dim, self.attn_dropout, branches
        )
        self.attention_net = nn.Sequential(
            fc, nn.ReLU(inplace=True), nn.Dropout(dropout), attention
        )
        self.classifiers = self._bag_classifiers(num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(num_classes))
        self.embed_dim = hidden * branches

    def _bag_classifiers(self, num_classes: int) -> nn.Module:
        if self.multi_branch:  # CLAM_MB: one Linear(512, 1) per class, on that class's branch
            return nn.ModuleList(nn.Linear(self.hidden, 1) for _ in range(num_classes))
        return nn.Linear(self.hidden, num_classes)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        h = self.attention_net[:3](x)  # (B, N, 512): Linear, ReLU, Dropout
        raw = self.attention_net[3](h).transpose(1, 2)  # (B, K, N) pre-softmax (CLAM's A_raw)
        att = masked_softmax(raw, mask)
        pooled = torch.bmm(att, h)  # (B, K, 512)
        if self.multi_branch:
            w = torch.cat([c.weight for c in self.classifiers])  # (C, 512)
            b = torch.cat([c.bias for c in self.classifiers])
            logits = (pooled * w).sum(-1) + b  # class c from branch c only
        else:
            logits = self.classifiers(pooled[:, 0])
        inst = self.instance_margins(h)
        if mask is not None:
            inst = inst.masked_fill(~mask[..., None], 0.0)
        if not self.multi_branch:
            att, raw = att[:, 0], raw[:, 0]
        if self.training:
            # training_loss runs the instance classifiers on the selected rows of THIS forward's
            # h (same dropout draw). Only the classifiers a bag's loss uses then get a gradient;
            # the others keep grad None, so Adam skips them exactly as in the official code.
            self._train_cache = (raw, h)
        return MILOutput(
            logits=logits,
            embedding=pooled.flatten(1),
            attention=att,
            attention_logits=raw,
            instance_logits=inst,
        )

    def instance_margins(self, h: Tensor) -> Tensor:
        """Instance classifier log-odds ``d_ic = z_ic[1] − z_ic[0]`` (B, N, C) from ``h``."""
        w = torch.stack([c.weight[1] - c.weight[0] for c in self.instance_classifiers])
        b = torch.stack([c.bias[1] - c.bias[0] for c in self.instance_classifiers])
        return F.linear(h, w, b)

    # ------------------------------------------------------------------ losses
    def instance_loss_fn(self, scores: Tensor, targets: Tensor) -> Tensor:
        """CLAM's instance loss on (S, 2) instance-classifier scores: smooth SVM or CE."""
        if self.inst_loss == "svm":
            return smooth_top1_svm_loss(scores, targets)
        return F.cross_entropy(scores, targets)

    def _bag_instance_loss(
        self, raw: Tensor, h: Tensor, label: int, index: int
    ) -> tuple[Tensor | None, int, int]:
        """Clustering loss of one bag from raw (K, n) attention logits and h (n, 512)."""
        n = raw.shape[-1]
        k = self.k_sample
        if n < k:
            if self.small_bags == "error":
                raise ModelError(
                    self.model_name,
                    f"bag {index} has {n} instances, fewer than "
                    f"k_sample = {k} (the official CLAM code fails here in torch.topk)",
                    hint="Pass small_bags='clip' (use all n instances) or 'skip' (no instance "
                    "loss for such bags), or lower k_sample",
                )
            if self.small_bags == "skip":
                return None, 0, 0
            k = n
        total: Tensor | None = None
        correct = count = 0
        for c, classifier in enumerate(self.instance_classifiers):
            scores = raw[c if self.multi_branch else 0]
            top = scores.topk(k).indices
            if c == label:  # in-the-class: top k are positive, bottom k negative evidence
                bottom = (-scores).topk(k).indices
                rows = torch.cat([top, bottom])
                t = torch.cat([torch.ones(k), torch.zeros(k)]).to(torch.long)
            elif self.subtyping:  # out-of-the-class: top k are false positives (negative)
                rows = top
                t = torch.zeros(k, dtype=torch.long)
            else:
                continue
            z = classifier(h[rows])  # (S, 2), as CLAM's classifier(index_select(h, top))
            t = t.to(z.device)
            loss = self.instance_loss_fn(z, t)
            total = loss if total is None else total + loss
            correct += int((z.detach().argmax(dim=1) == t).sum())
            count += int(t.numel())
        if total is not None and self.subtyping:
            total = total / self.num_classes
        return total, correct, count

    def _instance_inputs(self, batch: dict[str, Any], output: MILOutput) -> tuple[Tensor, Tensor]:
        """(raw attention logits (B, K, N), h (B, N, 512)) of the forward that made ``output``."""
        cache = self.__dict__.pop("_train_cache", None)
        if cache is not None and cache[0] is output.attention_logits:
            raw, h = cache
        elif not self.training:  # eval: h is deterministic, recompute it
            raw, h = output.attention_logits, self.attention_net[:3](batch["features"])
        else:
            raise ModelError(
                self.model_name,
                "training_loss needs the output of this model's latest "
                "training-mode forward (its instance embeddings carry that forward's dropout)",
                hint="Call model(x) and then model.training_loss(batch, output, criterion)",
            )
        if raw is None:
            raise ModelError(self.model_name, "output lacks attention logits")
        return (raw.unsqueeze(1) if raw.ndim == 2 else raw), h

    def training_loss(
        self, batch: dict[str, Any], output: MILOutput, criterion: nn.Module
    ) -> tuple[Tensor, dict[str, float]]:
        """``bag_weight · criterion(logits, y) + (1 − bag_weight) · mean_b L_inst,b``.

        Without ``inst_cluster`` the loss is the bag loss alone (CLAM's ``train_loop``).
        """
        labels = batch["label"]
        bag_loss = criterion(output.logits, labels)
        logs = {"loss_ce": float(bag_loss.detach())}
        if not self.inst_cluster:
            self.__dict__.pop("_train_cache", None)
            return bag_loss, logs
        raw, h = self._instance_inputs(batch, output)
        mask = batch.get("mask")
        inst_sum = bag_loss.new_zeros(())
        correct = count = skipped = 0
        for i in range(raw.shape[0]):
            if mask is None:
                raw_i, h_i = raw[i], h[i]
            else:
                keep = mask[i].to(torch.bool).nonzero().squeeze(1)
                raw_i, h_i = raw[i][:, keep], h[i][keep]
            loss_i, c_i, n_i = self._bag_instance_loss(raw_i, h_i, int(labels[i]), i)
            if loss_i is None:
                skipped += 1
                continue
            inst_sum = inst_sum + loss_i
            correct, count = correct + c_i, count + n_i
        inst_loss = inst_sum / raw.shape[0]
        loss = self.bag_weight * bag_loss + (1.0 - self.bag_weight) * inst_loss
        logs["loss_instance"] = float(inst_loss.detach())
        if count:
            logs["instance_acc"] = correct / count
        logs["instance_skipped"] = float(skipped)
        return loss, logs

    def reset_classifier(self, num_classes: int) -> None:
        """New bag and instance classifiers (and, for MB, attention branches) for C classes."""
        device = self.instance_classifiers[0].weight.device
        self.classifiers = self._bag_classifiers(num_classes).to(device)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(self.hidden, 2) for _ in range(num_classes)
        ).to(device)
        if self.multi_branch:
            attention = self.attention_net[3]
            old = attention.attention_c if self.gate else attention.module[-1]
            new = nn.Linear(old.in_features, num_classes).to(device)
            if self.gate:
                attention.attention_c = new
            else:
                attention.module[-1] = new
            self.embed_dim = self.hidden * num_classes
        self.num_classes = num_classes


_DOC_COMMON = """
    Paper: Lu, Williamson, Chen, Chen, Barbieri, Mahmood, "Data-efficient and weakly supervised
    computational pathology on whole-slide images", Nat. Biomed. Eng. 5, 555–570 (2021).
    Code: github.com/mahmoodlab/CLAM ``models/model_clam.py`` (``{cls}``), training in
    ``main.py`` and ``utils/core_utils.py`` (``train_loop_clam``); checked at commit 53e2409.

    Equations (bag ``X ∈ R^{{N×D}}``, classes c = 1..C)::

        h_i = Dropout(ReLU(W_1 x_i + b_1))                               (512-d)
        e_ik = w_k^T (tanh(V h_i) ⊙ sigmoid(U h_i)) + b_k     gated ("gate=True"), or
        e_ik = w_k^T tanh(V h_i) + b_k                         plain; V, U: 256 ("small") / 384
        a_ik = softmax_i(e_ik),  m_k = Σ_i a_ik h_i
{bag_eq}
        Instance clustering (training only, label y): for each class c, classifier
        W_c^inst ∈ R^{{2×512}}; with r = the attention branch {branch_of_c}:
          c = y:                 top-k_sample instances by r → target 1, bottom-k → target 0
          c ≠ y and subtyping:   top-k_sample instances by r → target 0
          L_inst = Σ_c loss_c  (divided by C when subtyping)
        L = bag_weight · CE(logits, y) + (1 − bag_weight) · L_inst

    Defaults are CLAM's README training commands: gated, "small", dropout 0.25 (plus the
    attention branches' hard-coded Dropout(0.25)), k_sample 8, ``inst_loss="svm"``
    (:func:`smooth_top1_svm_loss`; ``"ce"`` = cross-entropy, the argparse default), bag_weight
    0.7, subtyping off, PyTorch default init (CLAM dropped Xavier init in 2024-04, d613a3d).
    Submodule and parameter names equal the official ones (``attention_net.0``,
    ``attention_net.3.attention_a/b/c`` or ``attention_net.3.module.*``, ``classifiers``,
    ``instance_classifiers``), so a state dict of the current official class loads with
    ``strict=True`` once ``instance_loss_fn.*`` buffers (SmoothTop1SVM's ``labels``) and
    DataParallel ``.module`` infixes are removed.

    Outputs: ``attention`` {att_shape} (softmax, 0 at padding), ``attention_logits`` the
    pre-softmax ``A_raw``; ``instance_logits`` (B, N, C) holds ``d_ic = z_ic[1] − z_ic[0]``, the
    log-odds of instance classifier c (C separate binary classifiers: use σ(d_ic), not a
    softmax over c); ``embedding`` {emb_shape}.

    Batching and departures: bags are batched with a mask (the official code takes one bag).
    Top-k is ranked on the pre-softmax attention of real instances (CLAM ranks the softmax, the
    same order). Bags with fewer than k_sample real instances make ``torch.topk`` fail in the
    official code (train and validation, since ``validate_clam`` also evaluates instances);
    here ``small_bags="clip"`` (default) uses k = n for such bags — what the official code
    does at n = k, where the positive and negative sets are the whole bag — ``"skip"`` gives
    them no instance loss (logged as ``instance_skipped``) and ``"error"`` raises as CLAM does.
    For k ≤ n < 2k the positive and negative sets overlap, as in the official code. The
    validation loss used for early stopping is the bag loss only, as in ``validate_clam``.

    ``training_preset``: Adam, lr 2e-4, weight decay 1e-5, ≤ 200 epochs, no scheduler,
    class-balanced sampling (``--weighted_sample``), early stopping on the validation loss,
    patience 20, not before the 52nd epoch (``EarlyStopping(20, stop_epoch=50)``, 0-based
    ``epoch > 50``).

    Args:
        in_dim: instance feature dimension D (CLAM's ``embed_dim``).
        num_classes: C ≥ 2.
        gate: gated attention (``Attn_Net_Gated``) or plain (``Attn_Net``).
        size: ``"small"`` (512, 256) or ``"big"`` (512, 384).
        dropout: dropout after the first Linear (CLAM ``--drop_out``).
        attn_dropout: dropout in the attention branches; None = CLAM's rule (0.25 if
            ``dropout > 0`` else none).
        k_sample: instances per positive/negative set (CLAM ``--B``).
        inst_loss: ``"svm"`` (smooth top-1 SVM) or ``"ce"``.
        bag_weight: weight of the bag loss; the instance loss gets ``1 − bag_weight``.
        subtyping: also train out-of-class instance classifiers (mutually exclusive classes).
        inst_cluster: False = bag loss only (CLAM ``--no_inst_cluster``).
        small_bags: ``"clip"`` | ``"skip"`` | ``"error"`` for bags with fewer than k_sample
            instances (see above).
"""


@register_aggregator(
    "clam-sb",
    description="CLAM-SB (Lu 2021): gated attention + instance clustering, smooth SVM, k=8",
)
class CLAMSB(_CLAM):
    __doc__ = (
        "CLAM-SB: single attention branch with instance-level clustering."
        + _DOC_COMMON.format(
            cls="CLAM_SB",
            bag_eq="        logits = W_cls m_1 + b_cls                      (one branch, K = 1)",
            branch_of_c="e_i1 (the single branch)",
            att_shape="(B, N)",
            emb_shape="(B, 512) = m_1",
        )
    )

    multi_branch: ClassVar[bool] = False
    model_name: ClassVar[str] = "clam-sb"


@register_aggregator(
    "clam-mb",
    description="CLAM-MB (Lu 2021): one attention branch per class + instance clustering",
)
class CLAMMB(_CLAM):
    __doc__ = "CLAM-MB: one attention branch per class with instance-level clustering." + (
        _DOC_COMMON.format(
            cls="CLAM_MB",
            bag_eq="        logits_c = w_c^T m_c + b_c                     (K = C branches)",
            branch_of_c="e_ic (class c's own branch)",
            att_shape="(B, C, N) (one row per class branch)",
            emb_shape="(B, C·512) = [m_1, …, m_C]",
        )
        + """
    CLAM_MB builds ``logits`` with ``torch.empty(1, C).float()``, so the official logits are
    float32 even for a float64 module; milkit keeps the input's dtype (a float64 run agrees
    with the official one in float64 once that cast is removed, and to float32 rounding with it).
"""
    )

    multi_branch: ClassVar[bool] = True
    model_name: ClassVar[str] = "clam-mb"
