"""Data-parallel training through ``torchrun`` (DDP) and the epoch-seeded sampler.

``torchrun --nproc_per_node K -m milkit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
``setup_distributed`` then initialises the process group (gloo on CPU, nccl on CUDA). Only rank 0
writes files. ``EpochSampler`` draws each epoch's order from ``seed + epoch`` alone (like
``DistributedSampler``), so a resumed run sees the same order as an uninterrupted one, and a
K-process run with batch 1 sees, step by step, the same bags as one process accumulating K.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when ``WORLD_SIZE > 1`` (idempotent); describe the job."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def cleanup_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of ``flag`` on every rank (early-stopping decisions stay in lockstep)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced) indices drawn from ``seed + epoch``, sharded over ranks.

    Args:
        n: dataset size.
        seed: base seed; call ``set_epoch`` before each epoch.
        shuffle: random permutation (else 0..n-1).
        weights: per-sample weights for sampling with replacement (balanced sampling).
        num_samples: draws per epoch with ``weights`` (default n).
        rank, world_size: this process's shard; the order is padded (wrapping round, as
            ``DistributedSampler`` does) to a multiple of ``world_size`` and rank r takes
            positions r, r + W, r + 2W, ...
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        num_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.weights = weights
        self.num_samples = int(num_samples or n)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-len(order) // self.world_size) * self.world_size
        while len(order) < total:  # wrap round (also when n < world_size)
            order = order + order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        base = self.num_samples if self.weights is not None else self.n
        return -(-base // self.world_size)
