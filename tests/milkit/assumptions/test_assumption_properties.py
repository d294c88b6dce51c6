"""Property checks without training: permutation, padding, monotonicity (spec §4)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from milkit import models
from milkit.assumptions.properties import check_properties, monotone_violation_rate
from milkit.models.base import MILModel, MILOutput, check_bag_input


class MeanPool(MILModel):
    """Hand-made shortcut-capable model: mean of instance embeddings, then a linear head."""

    mil_respecting = False

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, 16
        self.net = nn.Sequential(nn.Linear(in_dim, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        mask = check_bag_input(x, mask, model="meanpool")
        h = self.net(x)
        w = torch.ones(x.shape[:2]) if mask is None else mask.float()
        z = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        return MILOutput(logits=self.head(z), embedding=z)


class LeakyPadding(MeanPool):
    """Claims padding support but averages the padded rows too (a contract bug)."""

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        return super().forward(x, None)


class OrderAware(MeanPool):
    """Weights instances by position; claims permutation invariance (a bug to be caught)."""

    permutation_invariant: ClassVar[bool] = True

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        pos = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
        return super().forward(x * (1 + pos), mask)


def _report(model: nn.Module, **kw):
    torch.manual_seed(0)
    return check_properties(model, trials=24, seed=0, **kw)


def test_minet_is_monotone_and_invariant() -> None:
    torch.manual_seed(0)
    report = _report(models.create("mi-net", 16, 2))
    assert all(r.ok for r in report.results), report.to_dict()
    assert monotone_violation_rate(report) == 0.0
    assert report.get("monotone_poison").trials == 24
    assert report.get("padding").trials == 24


def test_threshold_mil_is_monotone() -> None:
    torch.manual_seed(0)
    report = _report(models.create("threshold-mil", 16, 2))
    assert monotone_violation_rate(report) == 0.0
    assert all(r.ok for r in report.results)


@pytest.mark.parametrize("factory", [lambda: MeanPool(16, 2), lambda: _abmil()])
def test_mean_pool_and_abmil_are_flagged_non_monotone(factory) -> None:
    torch.manual_seed(0)
    report = _report(factory())
    rate = monotone_violation_rate(report)
    assert 0.1 < rate < 0.95, report.to_dict()
    assert report.get("monotone_background").violations > 0
    assert report.get("monotone_background").worst > 1e-4
    # not claimed, so not a contract failure; permutation/padding hold
    assert all(r.ok for r in report.results)


def _abmil() -> nn.Module:
    if "abmil" not in models.list_models():
        pytest.skip("abmil not registered yet")
    return models.create("abmil", 16, 2)


def test_padding_leak_and_order_dependence_are_caught() -> None:
    leaky = _report(LeakyPadding(16, 2)).get("padding")
    assert leaky.claimed and leaky.violations == leaky.trials and not leaky.ok
    order = _report(OrderAware(16, 2)).get("permutation")
    assert order.claimed and order.rate > 0.9 and not order.ok


def test_claimed_monotone_model_that_is_not_fails() -> None:
    class FakeRespecting(MeanPool):
        mil_respecting = True

    report = _report(FakeRespecting(16, 2))
    assert not report.get("monotone_background").ok


def test_base_bags_can_come_from_a_draw_and_mode_is_restored() -> None:
    from milkit.assumptions.generators import make_task

    model = models.create("mi-net", 16, 2).train()
    bags = make_task("t1", 0, num_train=10, num_test=10).train.bags
    report = check_properties(model, bags=bags, trials=50, seed=1)
    assert report.get("permutation").trials == 10  # capped at the number of bags
    assert model.training
    d = report.to_dict()
    assert d["model"] == "MiNet" and {r["name"] for r in d["results"]} >= {"padding"}


def test_a_crashing_model_is_reported_not_raised() -> None:
    class Broken(MeanPool):
        def forward(self, x, mask=None, coords=None):
            raise RuntimeError("boom")

    report = _report(Broken(16, 2))
    assert all(r.error and "boom" in r.error and not r.ok for r in report.results)
    assert np.isnan(monotone_violation_rate(report))
