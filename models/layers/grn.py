"""Global Recycle Network (GRN) of MHIM-MIL v2: recycle masked instances into k global tokens.

Paper: Tang et al., "Multiple Instance Learning Framework with Masked Hard Instance Mining for
Gigapixel Histopathology Image Analysis", IJCV 2025 (arXiv 2509.11526). Code:
github.com/DearCaat/MHIM-MIL (master, ``modules/mhim_modules/merge.py``).

    G = MCA(q = LN(Q), kv = LN(X_r))        k global queries Q ∈ R^{k×d}, 8 heads × 64
    Q ← m_q Q + (1 − m_q) G                  after each training forward; Q gets no gradient

MCA = multi-head cross-attention (q/k/v Linears without bias, softmax, attention dropout,
output Linear + dropout, both 0.1). One LayerNorm is shared by queries and instances (as in the
official code). Departure: with B > 1 the EMA uses the mean of G over the batch (the official
code assumes B = 1), and the key-padding mask restricts each bag to its own recycled instances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class GlobalRecycleNetwork(nn.Module):
    """k EMA-updated global queries that attend over recycled instances.

    Args:
        dim: instance dimension d (512 in MHIM-MIL).
        num_queries: k (``merge_k``; options.py default 1).
        heads: attention heads (merge.py default 8).
        dim_head: per-head size (``merge_h_dim`` 64).
        dropout: attention and output dropout (merge.py default 0.1).
        momentum: EMA momentum m_q of the queries (``merge_mm``; options.py default 0.9998).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_queries: int = 1,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        momentum: float = 0.9998,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.momentum, self.dropout = heads, momentum, dropout
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        # merge.py: VPT-style uniform init ±sqrt(6 / (3·16·16 + dim)); no gradient, EMA only.
        bound = math.sqrt(6.0 / float(3 * 16 * 16 + dim))
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim), requires_grad=False)
        nn.init.uniform_(self.queries, -bound, bound)

    def forward(self, h: Tensor, recycled: Tensor) -> Tensor:
        """Global tokens (B, k, d) from instances ``h`` (B, N, d) where ``recycled`` (B, N)."""
        b = h.shape[0]
        # clone: the in-place EMA step must not touch the tensor saved for LayerNorm's backward
        q = self.to_q(self.norm(self.queries.clone())).expand(b, -1, -1)
        k, v = self.to_kv(self.norm(h)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=recycled[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    @torch.no_grad()
    def update(self, g: Tensor) -> None:
        """EMA step ``Q ← m_q Q + (1 − m_q) mean_b G_b``."""
        self.queries.mul_(self.momentum).add_(
            g.detach().mean(dim=0, keepdim=True), alpha=1.0 - self.momentum
        )
