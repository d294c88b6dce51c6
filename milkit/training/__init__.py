"""Training: the run configuration, the trainer, cross-validation, inference with a trained run.

The names below are importable from ``milkit.training`` directly (loaded on first use, so that
``milkit.training.config`` stays importable without torch).
"""

from __future__ import annotations

from milkit import lazy_exports

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

__getattr__ = lazy_exports("milkit.training", _EXPORTS)
