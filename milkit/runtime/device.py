"""The one place a ``--device`` value becomes a ``torch.device`` (feature extraction, training,
predict, heatmaps, reports)."""

from __future__ import annotations

import os

import torch

from milkit.errors import MilkitError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or empty) → ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.

    Under ``torchrun`` each rank thus gets its own GPU (``LOCAL_RANK``, 0 outside torchrun).
    Any other value is parsed by ``torch.device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...).

    Raises:
        MilkitError: a value torch does not know, or a CUDA device without CUDA.
    """
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MilkitError(
            "unknown device", value=device, hint="Use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MilkitError("CUDA device requested but CUDA is not available", value=device,
                          hint="Use --device cpu")  # fmt: skip
    return dev


__all__ = ["resolve_device"]
