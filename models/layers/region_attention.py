"""R²T's region attentions: R-MSA with EPEG and CR-MSA (Tang et al., CVPR 2024).

Paper: "Feature Re-Embedding: Towards Foundation Model-Level Performance in Computational
Pathology", CVPR 2024; official code github.com/DearCaat/RRT-MIL, ``modules/rmsa.py``.

Region grid (official ``padding`` + ``region_partition``): a bag of L tokens in file order is laid
out row by row in an H×H square, H = ⌈√L⌉ rounded UP to a multiple of ``region_num`` (R); the
H² − L missing tokens are zeros appended at the end, and - as in the official code - they take part
in the attention (no key mask), which keeps B = 1 results identical to the official model. The
square is cut into R×R regions of M×M tokens (M = H / R), each flattened row by row.

R-MSA (per region, P = M² tokens, h heads of size d)::

    E   = (q kᵀ) / √d                                  (h, P, P)
    E'  = E + DWConv_{k×1}(E)                           EPEG: per-head conv along the query axis
    out = proj(softmax(E') v)

EPEG is linear in q: ``DWConv(E)[i, j] = (Σ_t w_t q_{i+t-k//2}) · k_j / √d + b``, so
``E' = (q + conv_q(q)) kᵀ / √d + b`` where ``conv_q`` applies the same per-head kernel along the
token axis of q. The bias ``b`` is constant over each softmax row, so it cancels exactly. We
therefore run ``scaled_dot_product_attention`` on the modified queries: exactly the official
logits, without materialising (h, P, P) logits twice (the conv) - memory stays O(P·d) with the
fused kernels.

CR-MSA (per region w with tokens z_wp, K representatives, Φ ∈ R^{C×K})::

    s_wpk   = z_wp · Φ_k
    R_wk    = Σ_p softmax_p(s_w·k) z_wp                             (K per region)
    R̂_·k    = MSA over the regions of the bag, separately for each k
    z'_wp   = Σ_k R̂_wk · minmax_p(s_w·k)_p · softmax_k(s_wp·)_k       (min-max eps 1e-8)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "CrossRegionAttention",
    "RegionAttention",
    "RegionGrid",
    "region_grid",
    "regions_to_sequence",
    "sequence_to_regions",
]


class RegionGrid:
    """Geometry of one bag's region partition: square side ``side``, ``num`` regions per side."""

    def __init__(self, length: int, side: int, num: int) -> None:
        self.length, self.side, self.num = length, side, num
        self.size = side // num  # region side M
        self.pad = side * side - length


def region_grid(length: int, region_num: int | str = 8, max_region_side: int = 16) -> RegionGrid:
    """Region grid for a bag of ``length`` tokens.

    ``region_num`` is R (official default 8). ``"auto"`` keeps the official R = 8 while regions
    are at most ``max_region_side`` tokens wide (bags up to ~128² = 16k tiles) and grows R beyond
    that, so regions stay ≤ ~max_region_side² tokens: a 10⁵-tile bag gets R = 20 and 256-token
    regions instead of 1600-token ones (the official code would need ~5 GB of logits there).
    """
    side = math.isqrt(max(length, 1) - 1) + 1  # ⌈√L⌉
    if region_num == "auto":
        num = max(8, math.ceil(side / max_region_side))
    else:
        num = int(region_num)
        if num < 1:
            raise ValueError(f"region_num must be >= 1 or 'auto', got {region_num!r}")
    side += -side % num
    return RegionGrid(length, side, num)


def sequence_to_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(B, L, C) -> (B, R², M², C): zero-pad to H², lay out row by row, cut into regions."""
    if grid.pad:
        x = F.pad(x, (0, 0, 0, grid.pad))
    return rearrange(
        x, "b (gy my gx mx) c -> b (gy gx) (my mx) c", gy=grid.num, gx=grid.num, my=grid.size
    )


def regions_to_sequence(r: Tensor, grid: RegionGrid) -> Tensor:
    """Inverse of ``sequence_to_regions``: (B, R², M², C) -> (B, L, C), padding cropped."""
    x = rearrange(
        r, "b (gy gx) (my mx) c -> b (gy my gx mx) c", gy=grid.num, gx=grid.num, my=grid.size
    )
    return x[:, : grid.length]


class InnerAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis, with optional EPEG.

    Parameter names follow the official ``InnerAttention`` (``qkv``, ``proj``, ``pe``).

    Args:
        dim: token width C.
        num_heads: heads h (8 official).
        head_dim: width per head (C / h official).
        qkv_bias: bias in the qkv projection (True official).
        proj_drop: dropout after the output projection (0.1 official ``trans_dropout``).
        epeg_k: EPEG kernel size k along the query axis; 0 disables EPEG.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = True,
        proj_drop: float = 0.1,
        epeg_k: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.epeg_k = epeg_k
        # EPEG: Conv2d(h, h, (k, 1), padding (k//2, 0), groups=h, bias) on the (h, P, P) logits.
        self.pe = (
            nn.Conv2d(num_heads, num_heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=num_heads)
            if epeg_k > 0
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., P, C) -> (..., P, C)."""
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        q, k, v = rearrange(
            self.qkv(x), "b p (three h d) -> three b h p d", three=3, h=self.num_heads
        )
        extra = None
        if self.pe is not None:
            # E + DWConv(E) == (q + conv_q(q)) kᵀ / √d + b; b cancels in the softmax (module doc).
            q = q + F.conv2d(
                q, self.pe.weight, None, padding=(self.epeg_k // 2, 0), groups=self.num_heads
            )
            # Zero-valued link to the (softmax-invariant) bias, so every parameter has a
            # gradient (exactly 0) - optimisers and DDP then treat it like the official model.
            extra = self.pe.bias.sum() * 0.0
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_drop(self.proj(rearrange(out, "b h p d -> b p (h d)")))
        if extra is not None:
            out = out + extra
        return out.reshape(*lead, *out.shape[-2:])

    def epeg_logits(self, x: Tensor) -> Tensor:
        """Official EPEG logits ``E + DWConv(E)`` (h, P, P) per row of ``x`` (B', P, C); for tests."""
        q, k, _ = rearrange(
            self.qkv(x), "b p (three h d) -> three b h p d", three=3, h=self.num_heads
        )
        e = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        return e if self.pe is None else e + self.pe(e)


class RegionAttention(nn.Module):
    """R-MSA: native MHSA with EPEG inside each region of the bag (official ``RegionAttntion``).

    Input (B, L, C) of B bags of the SAME length L (unpadded); each bag has its own regions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        region_num: int | str = 8,
        epeg_k: int = 15,
        qkv_bias: bool = True,
        proj_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = InnerAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, epeg_k=epeg_k
        )

    def forward(self, x: Tensor) -> Tensor:
        grid = region_grid(x.shape[1], self.region_num)
        return regions_to_sequence(self.attn(sequence_to_regions(x, grid)), grid)


class CrossRegionAttention(nn.Module):
    """CR-MSA: K representatives per region, MHSA across the bag's regions (official
    ``CrossRegionAttntion``). Unlike the official code for B > 1, regions of different bags never
    attend to each other.

    Args:
        dim: token width C.
        num_heads: heads of the cross-region MHSA (``crmsa_heads``, 8 official).
        region_num: regions per side R (8 official, or ``"auto"``).
        crmsa_k: representatives per region K (3 official default).
        crmsa_mlp: Φ as MLP C→C/4→tanh→K without biases instead of a C×K matrix.
        qkv_bias, proj_drop: as in ``InnerAttention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        region_num: int | str = 8,
        crmsa_k: int = 3,
        crmsa_mlp: bool = False,
        qkv_bias: bool = True,
        proj_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = InnerAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.phi: nn.Module | nn.Parameter
        if crmsa_mlp:
            self.phi = nn.Sequential(
                nn.Linear(dim, dim // 4, bias=False),
                nn.Tanh(),
                nn.Linear(dim // 4, crmsa_k, bias=False),
            )
        else:
            self.phi = nn.Parameter(torch.empty(dim, crmsa_k))
            nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))  # official init of Φ

    def forward(self, x: Tensor) -> Tensor:
        grid = region_grid(x.shape[1], self.region_num)
        z = sequence_to_regions(x, grid)  # (B, W, P, C)
        s = self.phi(z) if isinstance(self.phi, nn.Module) else z @ self.phi  # (B, W, P, K)
        dispatch = s.softmax(dim=2)  # over the tokens of a region
        combine = s.softmax(dim=3)  # over the K representatives
        s_min = s.amin(dim=2, keepdim=True)
        s_max = s.amax(dim=2, keepdim=True)
        minmax = (s - s_min) / (s_max - s_min + 1e-8)
        reps = torch.einsum("bwpk,bwpc->bkwc", dispatch, z)  # (B, K, W, C)
        reps = self.attn(reps)  # MHSA over the W regions, per bag and representative
        out = torch.einsum("bkwc,bwpk->bwpc", reps, minmax * combine)
        return regions_to_sequence(out, grid)
