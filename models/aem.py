"""AEM — Attention Entropy Maximization (Zhang et al., arXiv 2406.15303; dazhangyu123/AEM).

A regulariser for any attention-based aggregator: ``L = CE + λ Σ_i p_i log p_i`` (= CE − λ H(p)),
with ``p`` the softmax over instances of the pre-softmax attention logits. Three registered names:

- ``aem-mha``: the official default base ``mha`` (one learnable query, 8-head cross-attention);
- ``aem-abmil``: the official ``abmil`` base (gated attention, no dropout);
- ``aem``: the regulariser around another registered model with differentiable pre-softmax
  ``attention_logits``, e.g. ``create("aem", 1024, 2, base="abmil", lamda=0.1)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, WrappedMIL, check_bag_input
from milkit.models.layers.attention_pool import AttentionPool
from milkit.models.layers.masking import masked_log_softmax, masked_softmax
from milkit.models.layers.multihead_query_pool import MultiHeadQueryPool
from milkit.models.registry import create, normalise_name, register_aggregator

# Official training recipe (dazhangyu123/AEM `main.py` + `config/*.yml`): AdamW, weight decay 1e-5
# (`wd: 0.00001`), lr 1e-4 (argparse default at commit 98a1f78; the newest main.py 42c8dbe uses
# 2e-4), per-iteration half-cosine to `min_lr: 0` without warmup (`adjust_learning_rate` called
# with epoch + it/len), `train_epoch: 50`, `B: 1`; the checkpoint kept is the epoch maximising
# val macro-AUC + val macro-F1; milkit's trainer monitors val_auc or val_loss only, so we use
# val_auc (departure).
AEM_TRAINING_PRESET: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 1e-5,
    "scheduler": "cosine",
    "warmup_epochs": 0,
    "epochs": 50,
    "batch_size": 1,
    "monitor": "val_auc",
}


def attention_entropy_term(attention_logits: Tensor, mask: Tensor | None) -> Tensor:
    """Per-bag AEM term ``Σ_i p_i log p_i`` (= −entropy) of pre-softmax attention logits.

    ``attention_logits`` is (B, N) — single branch: plain sum over instances, as the official
    ``abmil`` branch — or (B, H, N) — several heads/branches: sum over instances and heads divided
    by H, as the official ``mha``/``dsmil`` branch (``sum(p log p) / attn.shape[0]``). Computed in
    float32 from ``masked_log_softmax`` so padded instances contribute exactly 0. Returns (B,).
    """
    logits = attention_logits.float()
    logp = masked_log_softmax(logits, mask)
    p = masked_softmax(logits, mask)
    term = (p * logp).sum(dim=-1)
    if term.ndim > 1:
        term = term.flatten(1).mean(dim=1)
    return term


def subsample_instances(
    x: Tensor,
    mask: Tensor | None,
    ratio: float,
    coords: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Keep a uniformly random ``⌊ratio·N_b⌋`` (at least 1) of the real instances of every bag.

    Vectorised over the batch: random scores, a per-bag rank, and one gather. Kept instances stay
    in their original (raster) order — the official code keeps them in random order, which only
    matters for order-sensitive bases; we keep the canonical order on purpose.

    Returns ``(x_sub (B, K, D), mask_sub (B, K), index (B, K), coords_sub)`` where K is the largest
    kept count and ``index`` gives each kept row's position in ``x`` (padding slots point at
    dropped positions and are False in ``mask_sub``).
    """
    b, n, d = x.shape
    if mask is None:
        counts = torch.full((b,), n, dtype=torch.float64, device=x.device)
    else:
        counts = mask.sum(dim=1).to(torch.float64)
    # float64 floor matches the official `int(ratio * N)` in Python floats
    keep = torch.floor(ratio * counts).clamp(min=1).to(torch.long)
    scores = torch.rand(b, n, generator=generator, device=x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, 2.0)  # padding ranks after every real instance
    rank = scores.argsort(dim=1).argsort(dim=1)
    kept = rank < keep[:, None]
    pos = torch.arange(n, device=x.device).expand(b, n)
    index = torch.where(kept, pos, pos + n).argsort(dim=1)[:, : int(keep.max())]
    x_sub = x.gather(1, index[..., None].expand(-1, -1, d))
    mask_sub = torch.arange(index.shape[1], device=x.device)[None, :] < keep[:, None]
    coords_sub = None
    if coords is not None:
        coords_sub = coords.gather(1, index[..., None].expand(-1, -1, coords.shape[-1]))
    return x_sub, mask_sub, index, coords_sub


def _scatter_back(values: Tensor, index: Tensor, keep: Tensor, n: int, fill: float, dim: int):
    """Put per-kept-instance ``values`` back at their positions in a length-``n`` axis ``dim``."""
    shape = list(values.shape)
    shape[dim] = n
    out = values.new_full(shape, fill)
    view = [1] * values.ndim
    view[0], view[dim] = index.shape[0], index.shape[1]
    idx = index.view(view).expand_as(values)
    kmask = keep.view(view).expand_as(values)
    return out.scatter(dim, idx, values.masked_fill(~kmask, fill))


class AttentionEntropyMixin:
    """Shared ``forward`` of the AEM models: optional subsampling, base pass, weighted AEM term.

    Subclasses implement ``forward_base(x, mask, coords) -> MILOutput`` and set ``lamda``,
    ``subsampling`` and ``model_name``.
    """

    lamda: float
    subsampling: float
    model_name: str
    training: bool

    def forward_base(self, x: Tensor, mask: Tensor | None, coords: Tensor | None) -> MILOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        n = x.shape[1]
        kept: tuple[Tensor, Tensor] | None = None  # (index, keep) of a subsampled pass
        if self.training and self.subsampling < 1.0:
            x, keep, index, coords = subsample_instances(x, mask, self.subsampling, coords)
            mask = None if bool(keep.all()) else keep
            kept = (index, keep)
        out = self.forward_base(x, mask, coords)
        if out.attention_logits is None:
            raise ModelError(
                self.model_name,
                "the base model returns no attention_logits",
                hint="AEM regularises attention; wrap a model with instance attention "
                "(e.g. abmil-gated, abmil)",
            )
        if (
            self.training
            and self.lamda != 0.0
            and torch.is_grad_enabled()
            and not out.attention_logits.requires_grad
        ):
            raise ModelError(
                self.model_name,
                "the base model's attention_logits carry no gradient, so the "
                "AEM term cannot train it",
                hint="use a base whose attention comes from a differentiable softmax "
                "(e.g. abmil-gated, aem-mha)",
            )
        aux = dict(out.aux_losses)
        aux["aem_entropy"] = self.lamda * attention_entropy_term(out.attention_logits, mask).mean()
        attention, logits, inst = out.attention, out.attention_logits, out.instance_logits
        if kept is not None:
            index, keep = kept
            lowest = torch.finfo(logits.dtype).min
            logits = _scatter_back(logits, index, keep, n, lowest, logits.ndim - 1)
            if attention is not None:
                attention = _scatter_back(attention, index, keep, n, 0.0, attention.ndim - 1)
            if inst is not None:
                inst = _scatter_back(inst, index, keep, n, 0.0, 1)
        return MILOutput(
            logits=out.logits,
            embedding=out.embedding,
            attention=attention,
            attention_logits=logits,
            instance_logits=inst,
            aux_losses=aux,
        )


def _check_aem_args(name: str, lamda: float, subsampling: float) -> None:
    if not (0.0 < float(subsampling) <= 1.0):
        raise ModelError(
            name,
            "subsampling must be in (0, 1]",
            value=subsampling,
            hint="use e.g. 0.8 to keep 80% of the instances per training step, 1.0 = off",
        )
    if not math.isfinite(float(lamda)):
        raise ModelError(name, "lamda must be a finite number", value=lamda)


def _reduction(in_dim: int, inner_dim: int) -> nn.Sequential:
    """AEM ``DimReduction``: Linear(D_feat → D_inner, no bias) + ReLU (architecture/network.py)."""
    return nn.Sequential(nn.Linear(in_dim, inner_dim, bias=False), nn.ReLU())


@register_aggregator("aem-mha", description="AEM with the official 'mha' base (8-head query pool)")
class AEMMultiHeadQueryMIL(AttentionEntropyMixin, MILModel):
    """AEM with its official default base ``mha``: one learnable query, 8-head cross-attention.

    Paper: Zhang et al., "Attention Entropy Maximization for Multiple Instance Learning based
    Whole Slide Image Classification", arXiv 2406.15303. Code: github.com/dazhangyu123/AEM
    (``architecture/transformer.py`` ``MHA``/``MutiHeadAttention``; ``main.py`` loss).

    Equations (X ∈ R^{N×D_feat}):
        H = ReLU(X W_r)                          DimReduction, no bias   (N, D_inner)
        z, e = MultiHeadQueryPool(H)             e ∈ R^{8×N} pre-softmax (see that layer)
        ŷ = W_c z + b_c
        L = CE(ŷ, y) + λ · (1/8) Σ_h Σ_i p_hi log p_hi,  p_h = softmax_i(e_h)

    The weighted term is ``aux_losses["aem_entropy"]``. ``lamda``: the README example uses 0.1
    (our default); the argparse default is 0.0 at commit 98a1f78 (= the baseline) and 0.1 in the
    newest ``main.py``. ``inner_dim``: official (D_feat, D_inner) pairs are (384, 128), (512, 256),
    (768, 384), (1024, 512) for UNI and (1536, 768); for 1024-d ResNet50-trunc features we use 512
    (our choice, same 2:1 ratio as UNI's pair). ``subsampling`` r < 1 keeps ⌊r·N⌋ random instances
    per bag in every training forward (``--subsampling``, default 1.0 = off).
    Departures: padded batches (B > 1) with a mask are supported (official: B = 1 only); the cosine
    weight annealing of λ in the paper's v3 is not in the released code and not implemented.
    """

    training_preset: ClassVar[dict[str, Any]] = AEM_TRAINING_PRESET

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        inner_dim: int = 512,  # our choice for 1024-d inputs (official UNI pair 1024/512)
        num_heads: int = 8,  # MHA: MutiHeadAttention(D_inner, 8)
        dropout: float = 0.1,  # MutiHeadAttention(dropout=0.1)
        lamda: float = 0.1,  # README example; argparse default 0.0 = baseline
        subsampling: float = 1.0,  # --subsampling default (off)
    ) -> None:
        super().__init__()
        _check_aem_args("aem-mha", lamda, subsampling)
        self.model_name = "aem-mha"
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, inner_dim
        self.lamda, self.subsampling = float(lamda), float(subsampling)
        self.reduce = _reduction(in_dim, inner_dim)
        self.pool = MultiHeadQueryPool(inner_dim, num_heads=num_heads, dropout=dropout)
        self.head = nn.Linear(inner_dim, num_classes)  # Classifier_1fc(D_inner, C, 0.0)

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Bag embedding (B, D_inner), attention and attention logits (B, 8, N)."""
        return self.pool(self.reduce(x), mask)

    def forward_head(self, embedding: Tensor) -> Tensor:
        return self.head(embedding)

    def forward_base(self, x: Tensor, mask: Tensor | None, coords: Tensor | None) -> MILOutput:
        z, attention, logits = self.forward_features(x, mask)
        return MILOutput(self.forward_head(z), z, attention, logits)


@register_aggregator("aem-abmil", description="AEM with the official gated-ABMIL base")
class AEMGatedABMIL(AttentionEntropyMixin, MILModel):
    """AEM with the official ``abmil`` base: gated attention (Ilse et al. 2018), no dropout.

    Paper: Zhang et al., arXiv 2406.15303. Code: github.com/dazhangyu123/AEM
    (``architecture/transformer.py`` ``ABMIL`` + ``Attention_Gated``; ``main.py`` loss).

    Equations (X ∈ R^{N×D_feat}):
        h_i = ReLU(W_r x_i)                                         DimReduction, no bias
        e_i = w^T (tanh(V h_i + b_V) ⊙ sigmoid(U h_i + b_U)) + b_w  V, U ∈ R^{128×D_inner}
        a = softmax_i(e),  z = Σ_i a_i h_i,  ŷ = W_c z + b_c
        L = CE(ŷ, y) + λ Σ_i a_i log a_i                            (single branch: plain sum)

    Defaults and departures as in :class:`AEMMultiHeadQueryMIL` (``inner_dim`` 512 is our choice
    for 1024-d features; λ 0.1 from the README; subsampling off).
    """

    training_preset: ClassVar[dict[str, Any]] = AEM_TRAINING_PRESET

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        inner_dim: int = 512,  # our choice for 1024-d inputs (official UNI pair 1024/512)
        attn_dim: int = 128,  # ABMIL(conf, D=128)
        lamda: float = 0.1,  # README example; argparse default 0.0 = baseline
        subsampling: float = 1.0,  # --subsampling default (off)
    ) -> None:
        super().__init__()
        _check_aem_args("aem-abmil", lamda, subsampling)
        self.model_name = "aem-abmil"
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, inner_dim
        self.lamda, self.subsampling = float(lamda), float(subsampling)
        self.reduce = _reduction(in_dim, inner_dim)
        # Attention_Gated(D_inner, 128, K=1): tanh/sigmoid Linears with bias, no dropout; the
        # shared AttentionPool fuses V and U into one Linear (same function, same init law).
        self.pool = AttentionPool(inner_dim, attn_dim, gated=True, dropout=0.0, bias=True)
        self.head = nn.Linear(inner_dim, num_classes)  # Classifier_1fc(D_inner, C, 0)

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Bag embedding (B, D_inner), attention and attention logits (B, N)."""
        z, attention, logits = self.pool(self.reduce(x), mask)
        return z, attention, logits

    def forward_head(self, embedding: Tensor) -> Tensor:
        return self.head(embedding)

    def forward_base(self, x: Tensor, mask: Tensor | None, coords: Tensor | None) -> MILOutput:
        z, attention, logits = self.forward_features(x, mask)
        return MILOutput(self.forward_head(z), z, attention, logits)


@register_aggregator("aem", description="AEM entropy regulariser around any registered model")
class AEM(AttentionEntropyMixin, WrappedMIL):
    """AEM around any registered aggregator exposing ``attention_logits`` (plug-in mode).

    Paper: Zhang et al., arXiv 2406.15303 (AEM is shown on several attention MIL frameworks);
    code: github.com/dazhangyu123/AEM. ``L = L_base + λ · Σ_i p_i log p_i`` with p the masked
    softmax of the base's pre-softmax attention logits (heads averaged, see
    :func:`attention_entropy_term`). The base's own training hooks still run (its
    ``training_loss`` receives the output with the extra ``aem_entropy`` aux loss, and its
    ``on_train_step_end`` is called), and its order/padding/MIL properties are copied.

    Args:
        base: registered name of the wrapped model (default ``abmil-gated``).
        base_kwargs: overrides passed to ``models.create(base, ...)``.
        lamda: λ, default 0.1 (official README example; argparse default 0.0 = baseline).
        subsampling: keep ⌊r·N⌋ random instances per training forward; 1.0 = off.

    The base must return differentiable *pre-softmax* logits (a softmax over instances gives its
    attention): ABMIL variants qualify; milkit's ``transmil`` does not (its ``attention_logits``
    are the Nyström approximation's cls row, computed without gradient) and is refused in
    training with a clear error.

    ``training_preset`` is the AEM recipe (as for ``aem-mha``/``aem-abmil``): the paper trains
    every framework it regularises with that setup; pass overrides to use the base's recipe.
    """

    training_preset: ClassVar[dict[str, Any]] = AEM_TRAINING_PRESET

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        base: str = "abmil-gated",
        base_kwargs: dict[str, Any] | None = None,
        lamda: float = 0.1,  # README example; argparse default 0.0 = baseline
        subsampling: float = 1.0,  # --subsampling default (off)
    ) -> None:
        _check_aem_args("aem", lamda, subsampling)
        if normalise_name(base).startswith("aem"):
            raise ModelError(
                "aem",
                "the base already carries the AEM regulariser",
                value=base,
                hint="use that model directly and set its lamda",
            )
        super().__init__(create(base, in_dim, num_classes, **(base_kwargs or {})), in_dim,
                         num_classes)  # fmt: skip
        self.model_name = f"aem({normalise_name(base)})"
        self.lamda, self.subsampling = float(lamda), float(subsampling)

    def forward_base(self, x: Tensor, mask: Tensor | None, coords: Tensor | None) -> MILOutput:
        return self.base(x, mask, coords)  # AttentionEntropyMixin.forward adds the AEM term
