"""Attention pooling of Ilse et al. (2018), plain or gated, with a padding mask.

Paper: Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.
Code: github.com/AMLab-Amsterdam/AttentionDeepMIL (``model.py``). Equations (instance
embeddings ``h_i``, bag of N instances)::

    plain:  e_i = w^T act(V h_i)                       (paper Eq. 8, act = tanh)
    gated:  e_i = w^T (act(V h_i) ⊙ sigmoid(U h_i))    (paper Eq. 9, act = tanh)
    a = softmax_i(e),   z = Σ_i a_i h_i                (paper Eq. 6-7)

With K > 1 attention branches ``w`` becomes a (K, L) matrix and the K pooled vectors are
concatenated (Ilse's ``ATTENTION_BRANCHES``).

Two published layouts are covered by the constructor:

- CLAM-style (mahmoodlab/CLAM ``Attn_Net_Gated``): gated, biases, ``Dropout`` after the tanh and
  after the sigmoid branch: ``AttentionPool(512, 256, gated=True, dropout=0.25)``.
- DearCaat "DAttention" (MHIM-MIL ``mhim_modules/baseline.py``, RRT-MIL ``modules/datten.py``):
  not gated, no biases, ReLU by default: ``AttentionPool(512, 128, gated=False, bias=False,
  act="relu")`` (``act="tanh"`` for the R2T README commands). Its gated form
  (``AttentionGated``, MHIM's TCGA init checkpoints) applies the same ``act`` to the V branch:
  ``AttentionPool(512, 128, gated=True, bias=False, act="relu")``.

Speed: for the gated form the V and U projections are fused into ONE ``Linear(dim, 2L)`` (rows
``[:L]`` = V, rows ``[L:]`` = U); this is the same function with one GEMM instead of two.
State-dict note: a CLAM checkpoint's ``attention_a.0`` (V) and ``attention_b.0`` (U) weights map to
``proj.weight = cat([V.weight, U.weight])`` and ``proj.bias = cat([V.bias, U.bias])``; its
``attention_c`` maps to ``score``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from milkit.models.layers.masking import fill_masked

_ACTS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class PoolOutput(NamedTuple):
    """Result of attention pooling.

    Attributes:
        embedding: (B, K·M) pooled bag vector (K = branches, M = instance dim).
        attention: (B, N) for K = 1, else (B, K, N); softmax weights, exactly 0 at padding.
        logits: pre-softmax scores ``e``, same shape as ``attention`` (padding not filled).
    """

    embedding: Tensor
    attention: Tensor
    logits: Tensor


def make_act(act: str | type[nn.Module]) -> nn.Module:
    """Activation module from a name (``tanh``, ``relu``, ``gelu``) or a class."""
    if isinstance(act, str):
        key = act.lower()
        if key not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; accepted: {sorted(_ACTS)}")
        return _ACTS[key]()
    return act()


class AttentionPool(nn.Module):
    """Masked (gated) attention pooling ``z = Σ softmax(e)_i h_i`` (Ilse et al. 2018, Eq. 6-9).

    Args:
        dim: instance dimension M.
        attn_dim: hidden size L of the attention MLP.
        gated: gated attention (Eq. 9) instead of plain (Eq. 8).
        dropout: dropout after each attention branch's activation (CLAM uses 0.25).
        bias: biases in the attention Linears (DearCaat's DAttention has none).
        act: activation of the V branch (``tanh`` in the paper, plain and gated; DearCaat's
            DAttention: ``relu`` by default).
        branches: number K of attention branches.
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int = 256,
        *,
        gated: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
        act: str | type[nn.Module] = "tanh",
        branches: int = 1,
    ) -> None:
        super().__init__()
        if branches < 1:
            raise ValueError(f"AttentionPool: branches must be >= 1, got {branches}")
        self.dim, self.attn_dim, self.gated, self.branches = dim, attn_dim, gated, branches
        # Fused [V; U] projection for the gated form (see the module docstring).
        self.proj = nn.Linear(dim, attn_dim * (2 if gated else 1), bias=bias)
        self.act = make_act(act)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Linear(attn_dim, branches, bias=bias)

    def scores(self, h: Tensor) -> Tensor:
        """Pre-softmax attention logits ``e``: (B, N, M) -> (B, K, N)."""
        a = self.proj(h)
        if self.gated:
            v, u = a.split(self.attn_dim, dim=-1)
            # act(V h) ⊙ sigmoid(U h), each branch followed by its own dropout (CLAM).
            a = self.drop(self.act(v)) * self.drop(torch.sigmoid(u))
        else:
            a = self.drop(self.act(a))
        return self.score(a).transpose(1, 2)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> PoolOutput:
        """Pool instances ``h`` (B, N, M) with ``mask`` (B, N) bool (True = real) or None."""
        logits = self.scores(h)  # (B, K, N)
        weights = torch.softmax(fill_masked(logits, mask), dim=-1)
        if mask is not None:
            # exp(finfo.min - max) underflows to exactly 0 already; the multiply makes it explicit.
            weights = weights * mask.unsqueeze(1).to(weights.dtype)
        z = torch.bmm(weights, h).flatten(1)  # (B, K·M)
        if self.branches == 1:
            return PoolOutput(z, weights.squeeze(1), logits.squeeze(1))
        return PoolOutput(z, weights, logits)
