"""Masked softmax and friends: padding never receives weight and never produces NaN."""

from __future__ import annotations

import torch
from torch import Tensor


def fill_masked(logits: Tensor, mask: Tensor | None, dim_mask: int = -1) -> Tensor:
    """Set logits of padded instances to the dtype's minimum (so softmax gives them 0).

    ``mask`` is (B, N) bool, True = real; it is broadcast over any middle axes (heads) of
    ``logits`` shaped (B, ..., N).
    """
    if mask is None:
        return logits
    while mask.ndim < logits.ndim:
        mask = mask.unsqueeze(1)
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def masked_softmax(logits: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over instances with exact zeros at padding."""
    weights = torch.softmax(fill_masked(logits, mask), dim=dim)
    if mask is None:
        return weights
    while mask.ndim < weights.ndim:
        mask = mask.unsqueeze(1)
    return weights * mask.to(weights.dtype)


def masked_log_softmax(logits: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Log-softmax over instances; padded entries are 0 (use with ``p = exp`` masked to 0)."""
    logp = torch.log_softmax(fill_masked(logits, mask), dim=dim)
    if mask is None:
        return logp
    while mask.ndim < logp.ndim:
        mask = mask.unsqueeze(1)
    return logp.masked_fill(~mask, 0.0)
