"""``TrainConfig``: every knob of one training run, without importing torch.

It lives apart from the trainer (``milkit.training.trainer``, which re-exports it) so that the command line
can show the real defaults in ``milkit train --help`` without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from milkit.errors import MilkitError

_CHOICES = {
    "optimizer": ("adam", "adamw"),
    "scheduler": ("cosine", "cosine-epoch", "none"),
    "sampling": ("none", "balanced"),
    "monitor": ("val_auc", "val_loss"),
}


@dataclass
class TrainConfig:
    """Every knob of one training run; stored (as a plain dict) in checkpoints and run.json.

    Defaults are milkit's ("default" preset); ``TrainConfig.for_model(name, "official")`` starts
    from the model class's ``training_preset`` (the recipe of the paper's code) instead.
    """

    epochs: int = 50
    optimizer: str = "adamw"  # "adam" | "adamw"
    lr: float = 2e-4
    weight_decay: float = 1e-5
    # "cosine": stepped once per optimiser step; "cosine-epoch": the LR is constant within an
    # epoch and follows the cosine over epochs (CosineAnnealingLR(T_max=epochs) stepped per
    # epoch, as MHIM-MIL / R2T-MIL main.py); "none"
    scheduler: str = "cosine"
    warmup_epochs: float = 0
    min_lr: float = 0.0  # cosine floor (added here; CosineAnnealingLR's eta_min)
    batch_size: int = 1
    accumulate: int = 1
    sampling: str = "none"  # "none" | "balanced"
    class_weights: bool = False
    patience: int | None = None  # None: no early stopping (the whole schedule runs)
    min_epochs: int = 0
    # Model selection on the inner validation set (see ``Trainer.fit``). val_loss by default: it
    # is defined for any validation set and rarely ties, while the AUC of a small validation set
    # takes few values and often sits at 1.0 from the first epochs (that kept near-untrained
    # epoch-0 weights). val_auc breaks ties by the lower val_loss.
    monitor: str = "val_loss"  # "val_loss" | "val_auc"
    amp: bool = True  # CUDA only; ignored on CPU
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    grad_clip: float | None = None
    max_instances: int | None = None
    # Outside training (validation, test): keep this many evenly spaced instances of larger
    # bags, so a 300,000-tile test bag fits memory (an approximation the user opts into).
    eval_max_instances: int | None = None
    feature_dropout: float = 0.0
    cache: bool = False
    progress: bool = True
    threads: int | None = None  # torch intra-op threads; None: chosen from the bag size
    # last.pt, best.pt and the logs are written after the first and the last epoch and then at
    # most every this many seconds (0: every epoch). A killed run resumes exactly from the last
    # write, redoing at most this much work; tiny-bag epochs take milliseconds, and writing
    # (with fsync) every epoch cost more than training them.
    checkpoint_every_s: float = 10.0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = str(getattr(self, name)).lower()
            if value not in allowed:
                raise MilkitError(
                    f"training option {name} must be one of {list(allowed)}", value=value
                )
            setattr(self, name, value)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        positive["accumulate"] = self.accumulate
        for name, value in positive.items():
            if int(value) < 1:
                raise MilkitError(f"training option {name} must be >= 1", value=value)
        if self.lr <= 0:
            raise MilkitError("learning rate must be > 0", value=self.lr)
        if self.patience is not None and self.patience < 1:
            raise MilkitError("patience must be >= 1 (or unset to disable early stopping)",
                              value=self.patience)  # fmt: skip
        if not 0.0 <= self.feature_dropout < 1.0:
            raise MilkitError("feature_dropout must be in [0, 1)", value=self.feature_dropout)
        if self.checkpoint_every_s < 0:
            raise MilkitError("checkpoint_every_s must be >= 0", value=self.checkpoint_every_s)
        if self.threads is not None and int(self.threads) < 1:
            raise MilkitError("threads must be >= 1 (or unset to choose from the bag size)",
                              value=self.threads)  # fmt: skip

    @classmethod
    def for_model(cls, model_name: str, preset: str = "default", **overrides: Any) -> TrainConfig:
        """Config for ``model_name``: milkit defaults, or the model's official recipe.

        ``preset="official"`` applies the model class's ``training_preset`` dict; ``overrides``
        (e.g. from the command line) win over both. ``None`` overrides are ignored.
        """
        preset = preset.lower()
        if preset not in ("default", "official"):
            raise MilkitError(
                "unknown training preset", value=preset, hint="Use 'default' or 'official'"
            )
        values: dict[str, Any] = {}
        if preset == "official":
            from milkit.models.registry import get_entry

            entry = get_entry(model_name)  # UnknownNameError lists close matches
            values.update(getattr(entry.cls, "training_preset", {}) or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain dict; unknown keys are an error that lists the accepted ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MilkitError(
                f"unknown training option(s) {unknown}",
                hint=f"Accepted options: {sorted(known)}",
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
