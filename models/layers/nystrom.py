"""Nyström self-attention (Xiong et al. 2021) as used by TransMIL, with a key-padding mask.

Paper: Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
AAAI 2021. Implementation followed (facts, not code): github.com/lucidrains/nystrom-attention
(``nystrom_attention.py``), which TransMIL (github.com/szc19990412/TransMIL) imports.

For queries Q, keys K (scaled by 1/√d) and m landmarks Q̃, K̃ (means of consecutive segments of
length l = ⌈n/m⌉ after zero-padding the sequence at the FRONT to a multiple of m)::

    Ã = softmax(Q K̃^T) · pinv(softmax(Q̃ K̃^T)) · softmax(Q̃ K^T)           (Nyströmformer Eq. 14)
    out = Ã V + DWConv_33(V)                    (lucidrains ``residual=True``, per-head conv)

``pinv`` is the Newton–Schulz iteration of Razavi et al. (6 iterations) started from
``Z0 = A^T / (max_i Σ_j|A_ij| · max_j Σ_i|A_ij|)``.

Deliberate departures (all exact for one unmasked bag, i.e. B = 1 reproduces the reference):
- The maxima in ``Z0`` are taken per bag (the reference takes them over the whole batch, which
  makes one bag's output depend on the others).
- The product is evaluated as ``softmax(QK̃)·(pinv·(softmax(Q̃K)·V))`` with
  ``scaled_dot_product_attention`` for the two softmax products: same value (associativity), but
  the (n × m) attention matrices are never stored, which is what makes n = 10^5 fit in memory.
- With a mask, empty landmarks (segments without a real token) get an identity row/column in the
  landmark kernel instead of a uniform row, so the pseudo-inverse stays block-diagonal and
  padded content cannot leak into real outputs through it. Padded tokens' q/k/v are zeroed and
  excluded from landmark means and keys (as in the reference). Note: the outputs of real tokens
  still depend on the AMOUNT of padding (landmark segments and the depthwise conv are
  position-based); models that need per-bag equality must run each bag at its own length.
- ``query_row`` returns the approximate attention row of that query (e.g. the cls token) over the
  n input tokens; the reference's ``return_attn`` reads row 0 of the front-PADDED sequence,
  which is a padding token whenever padding was added.

Library versions: nystrom-attention ≤ 0.0.9 (the version TransMIL's requirements pin) cropped the
output with ``out[:, :n]`` after padding at the FRONT, so whenever n is not a multiple of m the
outputs are those of the wrong positions (the padding rows first, the last real tokens lost);
0.0.10 fixed this (``out[:, -n:]``, lucidrains commit d7eb229). We follow the fixed library;
``legacy_crop=True`` reproduces ≤ 0.0.9 (the attention row stays that of the real query).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn


def moore_penrose_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Iterative pseudo-inverse of (B, ..., m, m) matrices; initial scale per leading index B.

    Each step ``Z ← ¼ Z (13I − XZ(15I − XZ(7I − XZ)))`` is written with ``baddbmm`` so that
    every ``cI − A·B`` is one fused kernel (same arithmetic, fewer passes over memory): at
    m = 256 this O(m³) part, not the O(n·m) part, dominates TransMIL's CPU cost below 10^4 tiles.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).flatten(1).amax(dim=1)
    row = abs_x.sum(dim=-2).flatten(1).amax(dim=1)
    scale = (col * row).view(-1, *([1] * (x.ndim - 1)))
    shape = x.shape
    m = shape[-1]
    z = (x.transpose(-1, -2) / scale).reshape(-1, m, m)
    x3 = x.reshape(-1, m, m)
    eye = torch.eye(m, device=x.device, dtype=x.dtype).expand_as(x3)
    for _ in range(iters):
        xz = torch.bmm(x3, z)
        t = torch.baddbmm(15 * eye, xz, 7 * eye - xz, alpha=-1)  # 15I − XZ(7I − XZ)
        t = torch.baddbmm(13 * eye, xz, t, alpha=-1)  # 13I − XZ(...)
        z = torch.bmm(z, t).mul_(0.25)
    return z.reshape(shape)


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with optional key-padding mask (see module docstring).

    Args:
        dim: token dimension.
        heads: number of heads (TransMIL: 8).
        dim_head: per-head size (TransMIL: dim // 8 = 64).
        num_landmarks: m (TransMIL: dim // 2 = 256).
        pinv_iterations: Newton–Schulz steps (TransMIL: 6).
        residual: add the depthwise-conv residual on V (TransMIL: True).
        residual_conv_kernel: its kernel length (lucidrains default 33).
        eps: added to landmark token counts under a mask (lucidrains 1e-8).
        dropout: dropout after the output projection (TransMIL: 0.1).
        legacy_crop: reproduce nystrom-attention ≤ 0.0.9's crop ``out[:, :n]`` (module doc).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_conv_kernel: int = 33,
        eps: float = 1e-8,
        dropout: float = 0.0,
        legacy_crop: bool = False,
    ) -> None:
        super().__init__()
        self.legacy_crop = legacy_crop
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks, self.pinv_iterations, self.eps = num_landmarks, pinv_iterations, eps
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv: nn.Conv2d | None = None
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(
                heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False
            )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, query_row: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Attend over ``x`` (B, n, dim) with ``mask`` (B, n) bool (True = real) or None.

        Returns:
            ``(out, row)``: out (B, n, dim); row (B, heads, n) = approximate attention of query
            ``query_row`` over the n tokens (computed without gradient), or None.
        """
        n = x.shape[1]
        m = self.num_landmarks
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            if mask is not None:
                mask = F.pad(mask, (pad, 0), value=False)
        l_seg = (n + pad) // m
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        key_mask = lm_mask = None
        if mask is not None:
            keep = mask[:, None, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q = q * self.scale
        q_l = reduce(q, "b h (m l) d -> b h m d", "sum", l=l_seg)
        k_l = reduce(k, "b h (m l) d -> b h m d", "sum", l=l_seg)
        if mask is None:
            q_l, k_l = q_l / l_seg, k_l / l_seg
        else:
            count = reduce(mask.to(q.dtype), "b (m l) -> b m", "sum", l=l_seg)
            divisor = count[:, None, :, None] + self.eps
            q_l, k_l = q_l / divisor, k_l / divisor
            real_lm = count > 0
            key_mask, lm_mask = mask[:, None, None, :], real_lm[:, None, None, :]

        sim2 = q_l @ k_l.transpose(-1, -2)
        if mask is not None:
            pair = real_lm[:, None, :, None] & real_lm[:, None, None, :]
            eye = torch.eye(m, dtype=torch.bool, device=x.device)
            sim2 = sim2.masked_fill(~pair, torch.finfo(sim2.dtype).min).masked_fill(
                ~pair & eye, 0.0
            )
        inv = moore_penrose_pinv(sim2.softmax(dim=-1), self.pinv_iterations)
        # softmax(Q̃ K^T) V  and  softmax(Q K̃^T) (pinv · ·): scale already applied to q.
        kv = F.scaled_dot_product_attention(q_l, k, v, attn_mask=key_mask, scale=1.0)
        out = F.scaled_dot_product_attention(q, k_l, inv @ kv, attn_mask=lm_mask, scale=1.0)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        # ≤ 0.0.9 kept the FIRST n rows of the front-padded sequence (module docstring).
        out = out[:, :n] if self.legacy_crop else out[:, pad:]

        row = None
        if query_row is not None:
            with torch.no_grad():
                row = self._attention_row(q, k, q_l, k_l, inv, pad + query_row, key_mask, lm_mask)
            row = row[..., pad:]
        return out, row

    @staticmethod
    def _attention_row(
        q: Tensor,
        k: Tensor,
        q_l: Tensor,
        k_l: Tensor,
        inv: Tensor,
        index: int,
        key_mask: Tensor | None,
        lm_mask: Tensor | None,
        chunk: int = 16384,
    ) -> Tensor:
        """Row ``index`` of Ã, (B, H, n), in key chunks (never the full (m × n) matrix)."""
        s1 = q[:, :, index : index + 1] @ k_l.transpose(-1, -2)  # (B, H, 1, m)
        if lm_mask is not None:
            s1 = s1.masked_fill(~lm_mask, float("-inf"))
        r = s1.softmax(dim=-1) @ inv  # (B, H, 1, m)
        n = k.shape[2]
        # logsumexp of each landmark row of Q̃ K^T over the keys, accumulated chunk by chunk.
        lse = None
        for start in range(0, n, chunk):
            s3 = q_l @ k[:, :, start : start + chunk].transpose(-1, -2)
            if key_mask is not None:
                s3 = s3.masked_fill(~key_mask[..., start : start + chunk], float("-inf"))
            part = torch.logsumexp(s3, dim=-1, keepdim=True)
            lse = part if lse is None else torch.logaddexp(lse, part)
        pieces = []
        for start in range(0, n, chunk):
            s3 = q_l @ k[:, :, start : start + chunk].transpose(-1, -2)
            if key_mask is not None:
                s3 = s3.masked_fill(~key_mask[..., start : start + chunk], float("-inf"))
            pieces.append(r @ torch.exp(s3 - lse))
        return torch.cat(pieces, dim=-1).squeeze(2)
