"""Multi-head cross-attention pooling with one learnable query (AEM's "mha" aggregator).

Zhang et al., "Attention Entropy Maximization for Multiple Instance Learning based Whole Slide
Image Classification", arXiv 2406.15303; official code dazhangyu123/AEM,
``architecture/transformer.py`` (classes ``MHA`` and ``MutiHeadAttention``).

For a bag ``H ∈ R^{N×E}`` and a learnable query ``q ∈ R^{E}`` with H heads of size d = E / H:

    Q = W_q q + b_q,  K = W_k H + b_k,  V = W_v H + b_v        (split into H heads)
    e_h = Q_h K_h^T / √d                                       (B, H, N) pre-softmax logits
    a_h = softmax_N(e_h)                                       masked: padding gets exactly 0
    z = LayerNorm(Dropout(W_o [a_1 V_1; ...; a_H V_H] + b_o))  (B, E) bag embedding
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from milkit.models.layers.masking import fill_masked, masked_softmax


class MultiHeadQueryPool(nn.Module):
    """Pool a bag with one learnable query attending over the instances with H heads.

    Args:
        dim: instance (and output) dimension E.
        num_heads: number of heads; must divide ``dim``.
        dropout: dropout on the projected output (before LayerNorm).
        query_init_std: std of the normal init of the learnable query.
        norm_eps: LayerNorm epsilon.

    ``forward(h (B, N, E), mask (B, N) | None)`` returns ``(z (B, E), attention (B, H, N),
    attention_logits (B, H, N))``; logits at padding are the dtype's minimum so that
    ``softmax(attention_logits) == attention``.

    Cost: the key and value projections are folded into the query and the pooled bag (see
    ``forward``), so the per-instance work is O(E·H) instead of O(E²); parameters and outputs are
    those of the official layer (same state-dict names ``q_proj``/``k_proj``/``v_proj``/
    ``out_proj``, equal to its math up to float rounding — tested against torch's MHA).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,  # AEM MHA: MutiHeadAttention(D_inner, 8)
        dropout: float = 0.1,  # AEM MutiHeadAttention default dropout
        query_init_std: float = 1e-6,  # AEM MHA: nn.init.normal_(self.q, std=1e-6)
        norm_eps: float = 1e-6,  # AEM MutiHeadAttention: LayerNorm(eps=1e-6)
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadQueryPool: num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_heads = dim, num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.query, std=query_init_std)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.scale = 1.0 / math.sqrt(dim // num_heads)  # 1/√(E/H), as in the official code

    def forward(self, h: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        heads, d = self.num_heads, self.dim // self.num_heads
        q = rearrange(self.q_proj(self.query), "1 1 (h d) -> h d", h=heads)
        w_k = rearrange(self.k_proj.weight, "(h d) e -> h d e", h=heads)
        w_v = rearrange(self.v_proj.weight, "(h d) e -> h d e", h=heads)
        # Q_h·(W_k h + b_k)_h = h·(W_k,h^T Q_h) + Q_h·b_k,h: one (E → H) projection of the
        # instances instead of the full (E → E) key projection; same function.
        key_query = torch.einsum("hd,hde->he", q, w_k)
        key_bias = (q * self.k_proj.bias.view(heads, d)).sum(-1)
        logits = (torch.einsum("bne,he->bhn", h, key_query) + key_bias[:, None]) * self.scale
        logits = fill_masked(logits, mask)  # (B, H, N)
        attention = masked_softmax(logits, mask)
        # Σ_n a_hn (W_v h_n + b_v)_h = W_v,h (Σ_n a_hn h_n) + b_v,h because Σ_n a_hn = 1: pool
        # first, then project (E·E per bag instead of N·E·E).
        pooled = torch.einsum("bhn,bne->bhe", attention, h)
        values = torch.einsum("bhe,hde->bhd", pooled, w_v) + self.v_proj.bias.view(heads, d)
        z = self.out_proj(rearrange(values, "b h d -> b (h d)"))
        z = self.norm(self.dropout(z))
        return z, attention, logits
