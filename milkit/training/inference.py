"""Using a trained run: rebuild its models, predict new bags, score tiles (docs/architecture.md §5).

``milkit predict``, ``milkit heatmap``, the run report and the demo report all go through
these functions, so a fold ensemble and an attention map are computed one way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from milkit.errors import MilkitError
from milkit.io.checkpoint import read_checkpoint


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the aggregator of a checkpoint (or fill ``model``) and return ``(model, meta)``."""
    state, meta = read_checkpoint(path)
    if model is None:
        missing = [k for k in ("model_name", "in_dim", "class_names") if meta.get(k) is None]
        if missing:
            raise MilkitError(
                f"checkpoint metadata lacks {missing}",
                path=path,
                hint="Pass the model explicitly: load_checkpoint(path, model=...); weights "
                "trained with a paper's official code: convert them with `milkit import-weights "
                "SRC --family F --out CKPT` (milkit.models.load_official)",
            )
        from milkit import models

        try:
            model = models.create(
                meta["model_name"],
                int(meta["in_dim"]),
                len(meta["class_names"]),
                **dict(meta.get("model_kwargs") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MilkitError(
                "cannot rebuild the checkpoint's model",
                value=meta["model_name"],
                path=path,
                hint=str(err),
            ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MilkitError(
            "checkpoint weights do not fit the model",
            value=str(err).splitlines()[0][:200],
            path=path,
            hint="Was it written by a different model or version? Check meta['model_name']",
        ) from None
    model.to(map_location)
    model.eval()
    return model, meta


def check_bags_for_run(
    info: dict[str, Any], headers: dict[str, Any], *, where: str | os.PathLike[str]
) -> list[str]:
    """Check bag headers against a run before any model sees them (predict and heatmap alike).

    Args:
        info: the run (``milkit.io.runs.load_run``), for its ``in_dim``.
        headers: ``{slide_id: BagHeader}``.
        where: the bags folder or bag file named in the error.

    Raises MilkitError (one line, up to 5 slides) when a feature dimension differs from the
    run's ``in_dim``. Returns the ids of empty (0-tile) bags, which the caller skips or refuses.
    """
    wrong = [f"{sid} ({h.dim})" for sid, h in headers.items() if h.dim != info["in_dim"]]
    if wrong:
        raise MilkitError(
            f"feature dimension differs from the run's in_dim {info['in_dim']}",
            value=wrong[:5],
            path=where,
            hint="Extract the bags with the encoder used for training",
        )
    return [sid for sid, h in headers.items() if h.num_instances == 0]


def predict_run(
    run_dir: str | os.PathLike[str],
    dataset: Any,
    *,
    fold: str | int = "all",
    batch_size: int = 1,
    device: str = "auto",
    with_attention: bool = False,
    phase: str = "predict",
) -> Any:
    """Ensemble-mean ``Predictions`` of the selected fold checkpoints of a run.

    ``probs`` (n_bags, C) is the mean of the folds' class probabilities (``fold="all"``) or one
    fold's (``fold=k``). With ``with_attention``, ``attention`` holds one (N,) array per bag:
    the attention averaged over heads and over the folds' checkpoints (each sums to 1 for
    softmax attention). ``phase`` names the step in an out-of-memory message.

    Raises:
        MilkitError: not a run, no such fold, or attention requested from a model that returns
            none. ``milkit.runtime.oom.BagOutOfMemoryError`` when a bag does not fit.
    """
    from milkit.io.runs import fold_checkpoints, load_run
    from milkit.runtime.device import resolve_device
    from milkit.training.trainer import predict

    cfg = load_run(run_dir).get("train_config") or {}
    # an out-of-memory hint suggests the cap the run itself was evaluated (or trained) with
    cap = cfg.get("eval_max_instances") or cfg.get("max_instances")
    dev = resolve_device(device)
    probs, attention, first = [], [], None
    for ckpt in fold_checkpoints(run_dir, fold):
        model, meta = load_checkpoint(ckpt, map_location=dev)
        out = predict(model, dataset, batch_size=batch_size, device=dev, phase=phase,
                      with_attention=with_attention,
                      oom_kwargs={"model": meta.get("model_name"), "max_instances": cap})  # fmt: skip
        probs.append(out.probs)
        if with_attention:
            if out.attention is None:
                raise MilkitError(
                    f"model {meta.get('model_name')!r} returns no attention to "
                    + ("draw" if phase == "heatmap" else "export"),
                    path=ckpt, hint="Use an attention-based aggregator (e.g. abmil, transmil)",
                )  # fmt: skip
            attention.append([a.mean(axis=0) if a.ndim == 2 else a for a in out.attention])
        first = first or out
    first.probs = np.mean(probs, axis=0)
    if with_attention:
        first.attention = [np.mean(per_fold, axis=0) for per_fold in zip(*attention)]
    return first


def attention_scores(
    run_dir: str | os.PathLike[str],
    bag_path: str | os.PathLike[str],
    *,
    fold: str | int = "all",
    device: str = "auto",
    allow_encoder_mismatch: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(scores (N,), class probabilities (C,), class names) for one bag, averaged over folds
    (``predict_run`` with attention, phase ``heatmap``).

    Raises:
        MilkitError: the bag is missing or empty, its feature dimension differs from the run's,
            or its encoder/tile spec differs (unless ``allow_encoder_mismatch``).
        milkit.runtime.oom.BagOutOfMemoryError: the bag does not fit (phase ``heatmap``).
    """
    import sys

    from milkit.data.datasets import BagDataset
    from milkit.data.provenance import bag_spec, check_against_run, spec_from_run
    from milkit.io.bags import read_bag_header, slide_id_from_path
    from milkit.io.runs import load_run

    info = load_run(run_dir)
    if not Path(bag_path).is_file():
        raise MilkitError("bag file not found", path=bag_path)
    header = read_bag_header(bag_path)
    # the same dimension/empty check as `milkit predict`: one clean line, never a traceback
    if check_bags_for_run(info, {Path(bag_path).stem: header}, where=bag_path):
        raise MilkitError(
            "bag is empty (no tiles), so there is no attention to draw",
            path=bag_path,
            hint="The slide had no tissue tiles; see the preprocess manifest for the reason",
        )
    spec = {slide_id_from_path(bag_path): bag_spec(header)}
    for note in check_against_run(spec_from_run(info), spec, run_dir=run_dir,
                                  allow_mismatch=allow_encoder_mismatch):  # fmt: skip
        print(f"milkit heatmap: note: {note}", file=sys.stderr)
    out = predict_run(run_dir, BagDataset([bag_path]), fold=fold, device=device,
                      with_attention=True, phase="heatmap")  # fmt: skip
    return out.attention[0], out.probs[0], [str(c) for c in info["class_names"]]


def instance_scores(model: Any, dataset: Any, positive_index: int) -> dict[str, np.ndarray]:
    """Per-tile positive-class probability ``{slide_id: (N,)}`` from a model's instance logits,
    for heatmaps of models without attention (run on the model's current device, eval mode).

    Raises:
        MilkitError: the model returns no ``instance_logits`` either.
    """
    import torch

    out: dict[str, np.ndarray] = {}
    model.eval()
    with torch.inference_mode():
        for i in range(len(dataset)):
            item = dataset[i]
            coords = item.get("coords")
            res = model(item["features"][None], coords=None if coords is None else coords[None])
            if res.instance_logits is None:
                raise MilkitError(
                    "the model returns neither attention nor instance scores to draw",
                    value=type(model).__name__,
                    hint="Use an attention model (e.g. --model abmil) for heatmaps",
                )
            probs = torch.softmax(res.instance_logits[0].float(), dim=-1)[:, positive_index]
            out[str(item["slide_id"])] = probs.cpu().numpy()
    return out
