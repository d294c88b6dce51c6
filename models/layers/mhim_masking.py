"""Vectorised MHIM-MIL instance masking: per-bag top-k, random subsets, multi-head votes.

Everything works on (B, N) boolean masks with per-bag counts, so padded batches are handled
without Python loops or sets (MHIM-MIL v1 ``select_mask_fn`` builds index sets on the host).
Counts follow the official ``int(np.ceil(N * ratio))`` with N = the bag's number of REAL
instances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ceil_count(ratio: float, n_real: Tensor) -> Tensor:
    """``⌈ratio · n⌉`` per bag as int64 (computed in float64 like ``np.ceil``), clipped to n."""
    k = torch.ceil(n_real.to(torch.float64) * ratio).to(torch.int64)
    return torch.minimum(k, n_real)


def rank_within(scores: Tensor, valid: Tensor, *, largest: bool) -> Tensor:
    """Rank (0 = first chosen) of each instance among the valid ones of its bag; invalid
    instances rank after all valid ones. ``scores``, ``valid``: (..., N)."""
    fill = float("-inf") if largest else float("inf")
    keyed = scores.masked_fill(~valid, fill)
    order = keyed.argsort(dim=-1, descending=largest, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return rank.scatter_(-1, order, positions)


def topk_mask(scores: Tensor, k: Tensor, valid: Tensor, *, largest: bool = True) -> Tensor:
    """Boolean mask of the ``k[b]`` highest (or lowest) valid scores of each bag.

    ``scores`` (B, N) or (B, H, N) with ``valid`` broadcastable; ``k`` (B,).
    """
    valid = valid.expand_as(scores)
    rank = rank_within(scores, valid, largest=largest)
    k = k.view(-1, *([1] * (scores.ndim - 1)))
    return (rank < k) & valid


def random_subset(
    candidates: Tensor, k: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """A uniformly random subset of ``k[b]`` of each bag's candidates (B, N) bool."""
    noise = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return topk_mask(noise, k, candidates, largest=True)


def vote_topk(scores: Tensor, k: Tensor, valid: Tensor, *, largest: bool = True) -> Tensor:
    """MHIM-MIL multi-head "vote" fusion: each head of ``scores`` (B, H, N) marks its top-k;
    the k instances with most votes are chosen. Ties (the official ``topk`` breaks them
    arbitrarily) are broken here by the head-mean score, so the choice is reproducible."""
    per_head = topk_mask(scores, k, valid[:, None], largest=largest)
    votes = per_head.sum(dim=1).to(scores.dtype)
    mean = scores.mean(dim=1)
    tie = rank_within(mean, valid, largest=largest).to(scores.dtype) / (scores.shape[-1] + 1)
    return topk_mask(votes * 2 - tie, k, valid, largest=True)  # more votes, then better mean


def select(scores: Tensor, k: Tensor, valid: Tensor, *, largest: bool) -> Tensor:
    """Top-k per bag for (B, N) scores, vote fusion for (B, H, N) multi-head scores."""
    if scores.ndim == 3:
        return vote_topk(scores, k, valid, largest=largest)
    return topk_mask(scores, k, valid, largest=largest)


def mhim_mask(
    scores: Tensor,
    valid: Tensor,
    *,
    ratio_h: float,
    ratio_hr: float,
    ratio_r: float = 0.0,
    ratio_l: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Instances to REMOVE (B, N) bool: union of the random, low- and high-attention masks.

    - random ``ratio_r`` (β_r): ⌈β_r n⌉ uniformly random instances;
    - low ``ratio_l`` (β_l): the ⌈β_l n⌉ lowest-scored;
    - high ``ratio_h`` (β_h) with ``ratio_hr`` (ρ): the top ⌈(β_h/ρ) n⌉, of which a random
      ⌈ρ · that⌉ are masked (if β_h/ρ > 1: all n ranked, a random ⌈β_h n⌉ masked — the
      official cap).

    ``scores``: (B, N) teacher scores or (B, H, N) per-head attention (vote fusion);
    ``valid``: (B, N) real instances. If the union would remove every real instance of a bag,
    its lowest-scored removed instance is kept (the official code would crash on an empty bag).
    """
    n_real = valid.sum(dim=1)
    removed = torch.zeros_like(valid)
    if ratio_r > 0:
        removed |= random_subset(valid, ceil_count(ratio_r, n_real), generator)
    if ratio_l > 0:
        removed |= select(scores, ceil_count(ratio_l, n_real), valid, largest=False)
    if ratio_h > 0:
        top_ratio, keep_ratio = ratio_h / ratio_hr, ratio_hr
        if top_ratio > 1:  # official select_mask_fn: mask_ratio capped at 1, random ratio = β_h
            top_ratio, keep_ratio = 1.0, ratio_h
        top = select(scores, ceil_count(top_ratio, n_real), valid, largest=True)
        if keep_ratio < 1:
            top = random_subset(top, ceil_count(keep_ratio, top.sum(dim=1)), generator)
        removed |= top
    empty = ~(valid & ~removed).any(dim=1)
    if bool(empty.any()):
        flat = scores.mean(dim=1) if scores.ndim == 3 else scores
        rescue = topk_mask(flat, torch.ones_like(n_real), valid & removed, largest=False)
        removed &= ~(rescue & empty[:, None])
    return removed & valid


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """DINO-style cosine schedule: ``end + (start − end)·½(1 + cos(π·step/total))``;
    ``start`` at step 0 and ``end`` at step ``total`` (clipped to [0, total])."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
