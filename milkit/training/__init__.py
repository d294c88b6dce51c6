"""Training: the run configuration, the trainer, cross-validation, inference with a trained run.

The names below are importable from ``milkit.training`` directly (loaded on first use, so that
``milkit.training.config`` stays importable without torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "Trainer": "trainer",
    "FitResult": "trainer",
    "Predictions": "trainer",
    "fit_model": "trainer",
    "predict": "trainer",
    "CVResult": "cv",
    "cross_validate": "cv",
    "load_checkpoint": "inference",
    "predict_run": "inference",
    "attention_scores": "inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"milkit.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'milkit.training' has no attribute {name!r}")
