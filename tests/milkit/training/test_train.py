"""Trainer: reproducibility, resume, accumulation, early stopping, hooks, logs, predict."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from milkit.data.sampling import balanced_weights
from milkit.errors import MilkitError
from milkit.models.base import MILModel, MILOutput
from milkit.runtime.distributed import EpochSampler
from milkit.training.config import TrainConfig
from milkit.training.inference import load_checkpoint
from milkit.training.trainer import Predictions, Trainer, _cosine_lambda, fit_model, predict
from tests.milkit.training._train_helpers import (
    SOFTMAX_INVARIANT,
    datasets,
    max_abs_diff,
    one_thread,  # noqa: F401 (autouse fixture)
    small_abmil,
    state_equal,
)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 3, "lr": 1e-3, "progress": False, "seed": 7}
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- config
def test_config_official_preset_comes_from_model_class_and_overrides_win():
    cfg = TrainConfig.for_model("abmil", preset="official")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.scheduler) == ("adam", 2e-4, 200, "none")
    # CLAM core_utils.EarlyStopping(patience=20, stop_epoch=50) stops only when the 0-based epoch
    # is > 50, i.e. after the 52nd epoch, for every model main.py trains (one CLAM_RECIPE).
    assert (cfg.patience, cfg.min_epochs, cfg.monitor) == (20, 52, "val_loss")
    assert cfg.sampling == "balanced"  # CLAM README commands: --weighted_sample
    cfg = TrainConfig.for_model("abmil", preset="official", epochs=5, lr=None)
    assert cfg.epochs == 5 and cfg.lr == 2e-4  # None overrides are ignored
    assert TrainConfig.for_model("abmil").optimizer == "adamw"  # default preset


def test_config_errors_are_clear():
    with pytest.raises(MilkitError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(MilkitError, match=r"unknown training option\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(MilkitError, match="unknown training preset"):
        TrainConfig.for_model("abmil", preset="paper")
    with pytest.raises(MilkitError, match="accumulate must be >= 1"):
        TrainConfig(accumulate=0)
    assert TrainConfig.from_dict(TrainConfig(lr=3e-3).to_dict()) == TrainConfig(lr=3e-3)


def test_cosine_schedule_warmup_then_decays_to_floor():
    f = _cosine_lambda(total_steps=10, warmup_steps=2, floor=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    values = [f(s) for s in range(2, 11)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert f(10) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- sampler
def test_epoch_sampler_shards_partition_the_epoch_order_and_depend_only_on_epoch():
    full = EpochSampler(11, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(order) == list(range(11))
    shards = []
    for r in range(2):
        s = EpochSampler(11, seed=3, rank=r, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 6
    padded = order + order[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
    full.set_epoch(3)
    assert list(full) != order


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    s = EpochSampler(100, seed=0, weights=balanced_weights(labels), num_samples=4000)
    drawn = labels[list(s)]
    assert abs(drawn.mean() - 0.5) < 0.04


# ----------------------------------------------------------------------------- training
def test_training_learns_planted_signal_and_writes_logs_and_checkpoint(tmp_path):
    train, val = datasets(n_train=32, shift=5.0)
    model = small_abmil()
    result = fit_model(model, train, _cfg(epochs=6, lr=5e-3), val_ds=val, out_dir=tmp_path,
                       model_name="abmil",
                       model_kwargs={"fc_dim": 16, "attn_dim": 8})  # fmt: skip
    assert result.monitor == "val_loss"  # the default: selection on validation loss
    assert result.best_score == min(r["val_loss"] for r in result.history)
    assert result.history[result.best_epoch]["val_auc"] >= 0.9
    assert result.checkpoint == tmp_path / "best.pt"
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["epoch"]) == list(range(6))
    assert {"train_loss", "val_loss", "val_auc", "lr", "time_s"} <= set(log.columns)
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(6))
    # best.pt: plain weights-only file that rebuilds the model through the registry
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["meta"]["model_name"] == "abmil" and raw["meta"]["in_dim"] == 8
    assert raw["meta"]["epoch"] == result.best_epoch
    assert raw["meta"]["train_config"]["lr"] == 5e-3
    rebuilt, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["class_names"] == ["0", "1"]
    assert state_equal(rebuilt, model)  # fit leaves the best weights in the model
    p1, p2 = predict(model, val), predict(rebuilt, val)
    np.testing.assert_array_equal(p1.probs, p2.probs)


def test_two_runs_with_same_seed_give_identical_weights():
    train, val = datasets()
    runs = []
    for _ in range(2):
        model = small_abmil(seed=1)
        fit_model(model, train, _cfg(sampling="balanced", class_weights=True), val_ds=val)
        runs.append(model)
    assert state_equal(*runs)
    other = small_abmil(seed=1)
    fit_model(other, train, _cfg(sampling="balanced", class_weights=True, seed=8), val_ds=val)
    assert not state_equal(runs[0], other)


class _Crash(RuntimeError):
    pass


class _CrashingTrainer(Trainer):
    def _after_epoch(self, epoch: int) -> None:
        if epoch == 1:
            raise _Crash("simulated kill after epoch 2 was checkpointed")


@pytest.mark.parametrize("checkpoint_every_s", [0.0, 3600.0])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, checkpoint_every_s):
    """Every epoch checkpointed (0 s), or only the first (throttled writes): resume is exact."""
    train, val = datasets()
    cfg = _cfg(epochs=4, warmup_epochs=1, feature_dropout=0.1,
               checkpoint_every_s=checkpoint_every_s)  # fmt: skip
    train.feature_dropout = 0.1  # dataset augmentation draws from its own per-epoch RNG
    reference = small_abmil(seed=2)
    ref = Trainer(reference, cfg, tmp_path / "ref").fit(train, val)

    crashed = small_abmil(seed=2)
    with pytest.raises(_Crash):
        _CrashingTrainer(crashed, cfg, tmp_path / "run").fit(train, val)
    saved = 1 if checkpoint_every_s == 0 else 0  # throttled: only epoch 0 was written
    assert (
        json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == saved
    )
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == saved
    resumed = small_abmil(seed=99)  # different init: everything must come from last.pt
    torch.manual_seed(12345)  # and the global RNG must be restored, not inherited
    res = Trainer(resumed, cfg, tmp_path / "run").fit(train, val, resume=True)
    assert state_equal(resumed, reference)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    assert res.best_epoch == ref.best_epoch
    # resuming a finished run trains nothing more
    again = small_abmil(seed=5)
    res2 = Trainer(again, cfg, tmp_path / "run").fit(train, val, resume=True)
    assert len(res2.history) == 4 and state_equal(again, reference)


def test_gradient_accumulation_equals_the_padded_batch():
    train, _ = datasets(n_train=10)
    a, b = small_abmil(dropout=0.0, seed=3), small_abmil(dropout=0.0, seed=3)
    fit_model(a, train, _cfg(epochs=2, batch_size=2, scheduler="none"))
    fit_model(b, train, _cfg(epochs=2, batch_size=1, accumulate=2, scheduler="none"))
    assert max_abs_diff(a, b, skip=SOFTMAX_INVARIANT) < 1e-6
    np.testing.assert_allclose(predict(a, train).probs, predict(b, train).probs, atol=1e-6)
    c = small_abmil(dropout=0.0, seed=3)
    fit_model(c, train, _cfg(epochs=2, batch_size=1, accumulate=1, scheduler="none"))
    assert max_abs_diff(a, c, skip=SOFTMAX_INVARIANT) > 1e-4  # accumulation changed the updates


class _ScriptedTrainer(Trainer):
    """Validation returns a fixed sequence of scores (early-stopping logic in isolation)."""

    scores = (0.5, 0.7, 0.6, 0.65, 0.69, 0.68, 0.95, 0.5, 0.5, 0.5)

    def _validate(self, model, val_ds, criterion):
        epoch = len(getattr(self, "_seen", []))
        self._seen = [*getattr(self, "_seen", []), epoch]
        return {"val_auc": self.scores[epoch], "val_loss": 1.0 - self.scores[epoch]}


def test_early_stopping_uses_patience_min_epochs_and_keeps_best(tmp_path):
    train, val = datasets(n_train=4, n_val=4)
    auc = {"monitor": "val_auc"}
    res = _ScriptedTrainer(small_abmil(), _cfg(epochs=10, patience=3, **auc), tmp_path / "a").fit(
        train, val
    )
    assert res.stopped_early and len(res.history) == 5  # best at 1, three bad epochs: 2, 3, 4
    assert (res.best_epoch, res.best_score) == (1, 0.7)
    assert torch.load(tmp_path / "a" / "best.pt", weights_only=True)["meta"]["epoch"] == 1
    res = _ScriptedTrainer(small_abmil(), _cfg(epochs=10, patience=3, min_epochs=7, **auc),
                           tmp_path / "b").fit(train, val)  # fmt: skip
    assert (res.best_epoch, len(res.history)) == (6, 10)  # 0.95 at epoch 6 found thanks to min
    res = _ScriptedTrainer(small_abmil(), _cfg(epochs=4, monitor="val_loss"), None).fit(train, val)
    assert res.best_epoch == 1 and res.best_score == pytest.approx(0.3)


class _HookModel(MILModel):
    """Mean pooling; records hook calls and adds its own loss term through training_loss."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, in_dim
        self.head = nn.Linear(in_dim, num_classes)
        self.steps: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def forward(self, x, mask=None, coords=None):
        self.modes.append(self.training)
        z = x.mean(1)
        return MILOutput(logits=self.head(z), embedding=z,
                         aux_losses={"aux_l2": 0.01 * self.head.weight.pow(2).sum()})  # fmt: skip

    def training_loss(self, batch, output, criterion):
        loss, logs = super().training_loss(batch, output, criterion)
        logs["custom"] = 42.0
        return loss, logs

    def on_train_step_end(self, step, total_steps):
        self.steps.append((step, total_steps))


def test_trainer_calls_only_the_model_hooks():
    train, val = datasets(n_train=5, n_val=4)
    model = _HookModel(8, 2)
    res = fit_model(model, train, _cfg(epochs=2, accumulate=2), val_ds=val)
    assert model.steps == [(s, 6) for s in range(1, 7)]  # ceil(5 / 2) = 3 steps per epoch
    assert res.history[0]["train_custom"] == 42.0
    assert res.history[0]["train_aux_l2"] > 0
    assert True in model.modes and False in model.modes  # train() for fit, eval() for val
    assert not model.training


def test_predict_keeps_order_trims_attention_and_restores_mode():
    train, _ = datasets(n_train=7)
    model = small_abmil()
    model.train()
    out = predict(model, train, batch_size=3, with_attention=True)
    assert isinstance(out, Predictions) and model.training
    assert out.slide_ids == train.slide_ids and list(out.labels) == list(train.labels)
    assert out.probs.shape == (7, 2)
    np.testing.assert_allclose(out.probs.sum(1), 1.0, rtol=1e-6)
    assert [len(a) for a in out.attention] == [len(b) for b in train.bags]
    for a in out.attention:
        assert a.sum() == pytest.approx(1.0, abs=1e-5)
    single = predict(model, train, batch_size=1)
    np.testing.assert_allclose(single.probs, out.probs, atol=1e-5)  # padding changes nothing
    frame = out.to_frame(["neg", "pos"])
    assert list(frame.columns) == ["slide_id", "label", "pred", "prob_neg", "prob_pos"]


def test_non_finite_loss_is_a_clear_error():
    train, _ = datasets(n_train=4)
    train.bags[0][0, 0] = math.nan
    with pytest.raises(MilkitError, match="training loss is not finite"):
        fit_model(small_abmil(), train, _cfg(epochs=1))
