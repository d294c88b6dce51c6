"""DSMIL: dual-stream MIL with a max-instance critical query (Li, Li & Eliceiri, CVPR 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.layers.masking import fill_masked, masked_softmax
from milkit.models.registry import register_aggregator

LOSSES = ("bce", "ce")
INITS = ("orthogonal", "default")


class _InstanceClassifier(nn.Module):
    """dsmil.py ``FCLayer`` (names kept): ``fc = Sequential(Linear(D, O))``."""

    def __init__(self, in_dim: int, outputs: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class _BagClassifier(nn.Module):
    """dsmil.py ``BClassifier`` parameters (names kept): ``q``, ``v``, ``fcc``."""

    def __init__(
        self,
        in_dim: int,
        outputs: int,
        q_dim: int,
        dropout_v: float,
        nonlinear: bool,
        passing_v: bool,
        value_relu: bool = True,
    ) -> None:
        super().__init__()
        if nonlinear:
            self.q: nn.Module = nn.Sequential(
                nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh()
            )
        else:
            self.q = nn.Linear(in_dim, q_dim)
        if passing_v:
            # dsmil.py before 2022-09-18 (dbb5cab): Dropout→Linear without the ReLU
            v_act = [nn.ReLU()] if value_relu else []
            self.v: nn.Module = nn.Sequential(
                nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), *v_act
            )
        else:
            self.v = nn.Identity()
        # "1D convolutional layer that can handle multiple class": kernel = the whole embedding.
        self.fcc = nn.Conv1d(outputs, outputs, kernel_size=in_dim)


@register_aggregator(
    "dsmil",
    description="DSMIL (Li 2021): max-instance critical query + distance attention, 0.5/0.5 loss",
)
class DSMIL(MILModel):
    """DSMIL: instance stream (max pooling) and bag stream (attention to the critical instance).

    Paper: Li, Li, Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning", CVPR 2021. Code:
    github.com/binli123/dsmil-wsi ``dsmil.py`` (``FCLayer``, ``BClassifier``, ``MILNet``) and
    ``train_tcga.py`` (loss, init, optimiser), checked at commit 80465ed.

    Equations (bag ``X ∈ R^{N×D}``, O outputs)::

        c_i = W_0 x_i + b_0                                  instance scores (N, O)
        m_o = argmax_i c_io                                  critical instance of output o
        q_i = q(x_i), v_i = v(x_i)   q: Linear→ReLU→Linear→Tanh (nonlinear) or Linear, 128-d
                                     v: identity, or Dropout→Linear(D, D)→ReLU (passing_v)
        U_io = softmax_i( <q_i, q(x_{m_o})> / √128 )         attention (N, O)
        b_o = Σ_i U_io v_i                                   bag embedding (O, D)
        s_o = Conv1d(O, O, kernel D)(b)_o                    bag scores (O,)
        L = 0.5 · loss(s, y) + 0.5 · loss(max_i c_i, y)      (train_tcga.py)

    Outputs and classes. The official code trains O sigmoid outputs with ``BCEWithLogitsLoss``
    against one-hot labels, where a label equal to O means "negative" (all-zero target):
    Camelyon16 uses ``--num_classes 1`` (O = 1), TCGA-lung O = 2. ``negative_class=True``
    (default for C = 2) is that layout with class 0 negative: O = C − 1 and
    ``logits = [0, s_1, …, s_{C−1}]``, so for C = 2 ``softmax(logits)[1] = σ(s)`` is DSMIL's
    bag probability and cross-entropy equals its BCE exactly. ``negative_class=False`` (default
    for C > 2) gives every class an output (O = C, ``logits = s``). ``loss="bce"`` (default) is
    the official loss on those outputs (class weights of the trainer's criterion, if any,
    weight each bag by its class); ``"ce"`` uses the trainer's criterion on ``logits``
    instead. milkit's probabilities are ``softmax(logits)``; for O = C > 2 they rank bags
    like the official per-class sigmoids only in the argmax, not in value.

    ``attention``: the critical-instance attention ``U`` — (B, N) for O = 1, else (B, O, N);
    ``attention_logits`` its pre-softmax scaled scores. ``instance_logits`` (B, N, C): the
    instance scores in the same layout as ``logits`` (``[0, c_i]`` for C = 2).
    ``embedding``: ``b`` flattened (B, O·D).

    Defaults (``train_tcga.py``): nonlinear q (``--non_linearity 1``), ``passing_v`` off (the
    ``BClassifier`` default; the script does not set it), ``dropout_v`` 0 (``--dropout_node``),
    orthogonal weights and zero biases for every Linear/Conv1d (``apply_sparse_init``).
    ``√128`` is computed in float32 as in the official code (so float64 runs reproduce it).

    Older ``dsmil.py`` (2020-11 … 2022-09-18, before commit dbb5cab, the CVPR 2021 code) always had
    the value network, without the ReLU, and a linear q: ``nonlinear=False, passing_v=True,
    value_relu=False`` rebuilds it (same parameter names). The 2022-02 … 2022-09 versions with
    ``--non_linearity 1`` put a ``lin`` Linear→ReLU before q and v; milkit has no such layer.

    Departures: bags are batched with a mask (official: one bag); the critical instance is the
    first maximum of ``c`` over real instances (official: the first element of a descending
    ``torch.sort``, which may pick another instance among exact ties). ``training_preset``
    differs from ``train_tcga.py`` where ``TrainConfig`` cannot express it: Adam betas are
    PyTorch's (0.9, 0.999), not (0.5, 0.9); early stopping monitors
    validation AUC with patience 11 (official: (accuracy + mean AUC)/2 at optimal thresholds,
    stopping when ``counter > 10``).

    Args:
        in_dim: instance feature dimension D (official ``feats_size``).
        num_classes: C ≥ 2.
        negative_class: class 0 has no output (O = C − 1); None = ``num_classes == 2``.
        nonlinear: two-layer tanh query network (official default) or one Linear.
        passing_v: value network Dropout→Linear→ReLU instead of identity.
        value_relu: the ReLU of the value network (``dsmil.py`` since 2022-09-18); False =
            Dropout→Linear, as ``dsmil.py`` before then. Only used with ``passing_v``.
        dropout_v: dropout of the value network (``--dropout_node``).
        q_dim: query size (official: 128, fixed).
        loss: ``"bce"`` (official) or ``"ce"`` (trainer's criterion on ``logits``).
        init: ``"orthogonal"`` (train_tcga.py) or ``"default"`` (PyTorch).
    """

    model_name = "dsmil"

    permutation_invariant: ClassVar[bool] = True
    mil_respecting: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    # train_tcga.py: Adam lr 1e-4, weight decay 1e-3, 50 epochs, CosineAnnealingLR(eta_min 5e-6)
    # stepped per epoch, stop after more than 10 epochs without improvement; one bag per step.
    # See the docstring for what TrainConfig cannot express (betas, the selection score).
    training_preset: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 1e-3,
        "epochs": 50,
        "scheduler": "cosine-epoch",  # CosineAnnealingLR(T_max=50, eta_min=5e-6), per epoch
        "min_lr": 5e-6,
        "batch_size": 1,
        "patience": 11,
        "monitor": "val_auc",
    }

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        negative_class: bool | None = None,
        nonlinear: bool = True,  # --non_linearity 1
        passing_v: bool = False,  # BClassifier default
        value_relu: bool = True,  # dsmil.py since 2022-09-18
        dropout_v: float = 0.0,  # --dropout_node 0
        q_dim: int = 128,  # hard-coded in BClassifier
        loss: str = "bce",  # BCEWithLogitsLoss in train_tcga.py
        init: str = "orthogonal",  # apply_sparse_init in train_tcga.py
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ModelError("dsmil", "unknown loss", value=loss, hint=f"use one of {list(LOSSES)}")
        if init not in INITS:
            raise ModelError("dsmil", "unknown init", value=init, hint=f"use one of {list(INITS)}")
        if negative_class is None:
            negative_class = num_classes == 2
        self.in_dim, self.num_classes = in_dim, num_classes
        self.negative_class, self.loss, self.q_dim = bool(negative_class), loss, int(q_dim)
        self.outputs = num_classes - 1 if self.negative_class else num_classes
        self.i_classifier = _InstanceClassifier(in_dim, self.outputs)
        self.b_classifier = _BagClassifier(
            in_dim, self.outputs, self.q_dim, dropout_v, nonlinear, passing_v, value_relu
        )
        self.embed_dim = self.outputs * in_dim
        if init == "orthogonal":
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d)):
                    nn.init.orthogonal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def _to_logits(self, scores: Tensor) -> Tensor:
        """O output scores (..., O) → class logits (..., C) (``[0, s]`` with a negative class)."""
        if not self.negative_class:
            return scores
        return torch.cat([scores.new_zeros(*scores.shape[:-1], 1), scores], dim=-1)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        bc = self.b_classifier
        inst = self.i_classifier(x)  # (B, N, O)
        critical = fill_masked(inst.transpose(1, 2), mask).argmax(dim=-1)  # (B, O)
        values = bc.v(x)  # (B, N, D)
        queries = bc.q(x)  # (B, N, q)
        m_feats = torch.gather(x, 1, critical[..., None].expand(-1, -1, x.shape[-1]))
        q_max = bc.q(m_feats)  # (B, O, q), recomputed as in the official code
        # Official: torch.sqrt(torch.tensor(Q.shape[1], dtype=torch.float32)).
        scale = torch.tensor(queries.shape[-1], dtype=torch.float32).sqrt().to(x.dtype)
        scores = torch.bmm(q_max, queries.transpose(1, 2)) / scale  # (B, O, N)
        att = masked_softmax(scores, mask)
        bag = torch.bmm(att, values)  # (B, O, D)
        bag_scores = F.conv1d(bag, bc.fcc.weight, bc.fcc.bias).squeeze(-1)  # (B, O)
        inst_logits = self._to_logits(inst)
        if mask is not None:
            inst_logits = inst_logits.masked_fill(~mask[..., None], 0.0)
        if self.outputs == 1:
            att, scores = att[:, 0], scores[:, 0]
        return MILOutput(
            logits=self._to_logits(bag_scores),
            embedding=bag.flatten(1),
            attention=att,
            attention_logits=scores,
            instance_logits=inst_logits,
        )

    def max_instance_logits(self, output: MILOutput, mask: Tensor | None) -> Tensor:
        """Max-pooled instance logits over real instances (B, C) — DSMIL's instance stream."""
        inst = output.instance_logits
        if inst is None:
            raise ModelError("dsmil", "output lacks instance logits")
        if mask is not None:
            inst = inst.masked_fill(~mask.to(torch.bool)[..., None], torch.finfo(inst.dtype).min)
        return inst.max(dim=1).values

    def _loss(self, logits: Tensor, labels: Tensor, criterion: nn.Module) -> Tensor:
        if self.loss == "ce":
            return criterion(logits, labels)
        target = F.one_hot(labels, self.num_classes).to(logits.dtype)
        if self.negative_class:
            logits, target = logits[:, 1:], target[:, 1:]
        per_bag = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        weight = getattr(criterion, "weight", None)
        if weight is None:
            return per_bag.mean()
        w = weight.to(per_bag.dtype)[labels]
        return (w * per_bag).sum() / w.sum()

    def training_loss(
        self, batch: dict[str, Any], output: MILOutput, criterion: nn.Module
    ) -> tuple[Tensor, dict[str, float]]:
        """``0.5 · loss(bag logits) + 0.5 · loss(max-instance logits)`` (train_tcga.py)."""
        labels = batch["label"]
        bag_loss = self._loss(output.logits, labels, criterion)
        max_loss = self._loss(
            self.max_instance_logits(output, batch.get("mask")), labels, criterion
        )
        loss = 0.5 * bag_loss + 0.5 * max_loss
        return loss, {"loss_bag": float(bag_loss.detach()), "loss_max": float(max_loss.detach())}

    def reset_classifier(self, num_classes: int) -> None:
        """Rebuild the instance classifier and the bag Conv1d for C classes (the
        ``negative_class`` layout chosen at construction is kept)."""
        device = self.b_classifier.fcc.weight.device
        self.num_classes = num_classes
        self.outputs = num_classes - 1 if self.negative_class else num_classes
        self.i_classifier = _InstanceClassifier(self.in_dim, self.outputs).to(device)
        self.b_classifier.fcc = nn.Conv1d(self.outputs, self.outputs, self.in_dim).to(device)
        self.embed_dim = self.outputs * self.in_dim
