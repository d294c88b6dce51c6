"""Checkpoint files that can be loaded without running code (docs/architecture.md §5).

Two kinds of file:

- a *model checkpoint* (``best.pt`` or ``*.safetensors``): weights + model name + model keyword
  arguments + label map (class names) + ``in_dim`` + the training config, enough to rebuild the
  aggregator with ``models.create`` and predict;
- a *training state* (``last.pt``): the model checkpoint plus optimiser, scheduler, grad-scaler
  and RNG states, epoch and early-stopping counters, so a killed run resumes exactly.

Both are written atomically and contain only tensors and plain Python values (dict, list, str,
int, float, bool, None), so ``torch.load(path, weights_only=True)`` reads them. Loading always
uses ``weights_only=True``: a file holding a pickle that would run code is refused with a
``MilkitError`` rather than executed.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from milkit.errors import MilkitError, one_line, refused_global
from milkit.io.atomic import atomic_path

CHECKPOINT_FORMAT = "milkit-checkpoint"
TRAIN_STATE_FORMAT = "milkit-train-state"
FORMAT_VERSION = 1
SAFETENSORS_META_KEY = "milkit_meta"


def plain(value: Any, *, where: str = "meta") -> Any:
    """Return ``value`` as plain Python data (tuples → lists, paths → str); reject the rest.

    Checkpoints must stay loadable with ``weights_only=True``, which refuses arbitrary objects.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return value.item()
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint")


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    ignore_missing: tuple[str, ...] = (),
    ignore_unexpected: tuple[str, ...] = (),
) -> tuple[list[str], list[str], list[str]]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``own``.

    Returns ``(missing, unexpected, misshapen)`` key lists (``own`` order for missing and
    misshapen, ``state`` order for unexpected); keys starting with an ``ignore_*`` prefix are
    not reported. Callers word the error: a partial load must never happen silently.
    """
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore_unexpected)]
    misshapen = [
        k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, misshapen


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]
) -> Path:
    """Write the model's weights and ``meta`` atomically; ``.safetensors`` selects safetensors.

    ``meta`` should hold ``model_name``, ``model_kwargs``, ``class_names``, ``in_dim`` and
    ``train_config`` (plain values) so that ``load_checkpoint`` can rebuild the model.
    """
    path = Path(path)
    meta = plain(dict(meta))
    state = _cpu_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {SAFETENSORS_META_KEY: json.dumps(meta), "format": CHECKPOINT_FORMAT}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
        return path
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "meta": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def safe_torch_load(path: str | os.PathLike[str], *, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one clear MilkitError."""
    path = Path(path)
    if not path.is_file():
        raise MilkitError(
            "checkpoint not found",
            path=path,
            hint="Check the run folder; `milkit train --out RUN` writes RUN/fold_<k>/best.pt",
        )
    try:
        with warnings.catch_warnings():  # old pickle protocols warn; the load is still safe
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        what = refused_global(err)
        raise MilkitError(
            "refusing to load checkpoint: it contains Python objects other than weights and "
            f"plain values{f' ({what})' if what else ''} (loading it could run code)",
            path=path,
            hint="Only load checkpoints you trust; re-save the weights as a state_dict",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MilkitError(
            "cannot read checkpoint (truncated or not a PyTorch file)",
            value=one_line(str(err), limit=200),
            path=path,
            hint="Re-run training, or resume it with --resume",
        ) from None


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(state_dict, meta)`` from a ``.pt`` or ``.safetensors`` model checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MilkitError("checkpoint not found", path=path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types
            raise MilkitError(
                "cannot read safetensors checkpoint", value=str(err)[:200], path=path
            ) from None
        if SAFETENSORS_META_KEY not in header:
            raise MilkitError(
                "safetensors file has no milkit metadata (model name, classes)",
                path=path,
                hint="Pass the model explicitly: load_checkpoint(path, model=...)",
            )
        return state, json.loads(header[SAFETENSORS_META_KEY])
    payload = safe_torch_load(path)
    if isinstance(payload, Mapping) and payload.get("format") in (
        CHECKPOINT_FORMAT,
        TRAIN_STATE_FORMAT,
    ):
        key = "state_dict" if payload["format"] == CHECKPOINT_FORMAT else "model"
        return dict(payload[key]), dict(payload.get("meta", {}))
    if isinstance(payload, Mapping) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload), {}  # a bare state_dict
    raise MilkitError(
        "file is not a milkit checkpoint (no 'format' key)",
        path=path,
        hint="Use RUN/fold_<k>/best.pt written by `milkit train`",
    )


def save_train_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write a resumable training state (``last.pt``) atomically."""
    payload = {"format": TRAIN_STATE_FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training state written by ``save_train_state`` (weights-only, no code runs)."""
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping) or payload.get("format") != TRAIN_STATE_FORMAT:
        raise MilkitError(
            "file is not a milkit training state (last.pt)",
            path=path,
            hint="Start the run again without --resume",
        )
    return dict(payload)
