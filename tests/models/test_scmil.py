"""SC-MIL: SupCon against hand values, the β schedule, B = 1 fallback, padding invariance."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milkit import models
from milkit.errors import MilkitError
from milkit.models.abmil import ABMIL
from milkit.models.layers.supcon import ProjectionHead, supcon_loss
from milkit.models.scmil import SCMIL, scmil_beta

D = 12
SMALL = {"base_kwargs": {"fc_dim": 8, "attn_dim": 4}, "proj_dim": 6}


def _hand_supcon(
    z: list[list[float]], labels: list[int], tau: float, base_tau: float | None = 0.07
) -> float:
    """SupCon of Khosla et al. (L^sup_out) by loops. ``base_tau`` given: the reference
    implementation's normalisation (HobbitLong/SupContrast: anchors without a positive count 0,
    mean over ALL anchors, times τ/base_τ); None: mean over anchors with a positive (paper)."""

    def dot(a, b):
        return sum(u * v for u, v in zip(a, b, strict=True))

    losses = []
    for i, zi in enumerate(z):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            if base_tau is not None:
                losses.append(0.0)
            continue
        denom = sum(math.exp(dot(zi, z[a]) / tau) for a in range(len(z)) if a != i)
        terms = [math.log(math.exp(dot(zi, z[p]) / tau) / denom) for p in pos]
        losses.append(-sum(terms) / len(pos))
    scale = 1.0 if base_tau is None else tau / base_tau
    return scale * sum(losses) / len(losses)


def test_supcon_equals_hand_computed_value():
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.8, 0.5], [-0.3, 1.0], [-1.0, -0.4]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    loss, anchors = supcon_loss(z, labels, temperature=0.5)
    assert anchors == 4
    assert loss.item() == pytest.approx(_hand_supcon(z.tolist(), [0, 0, 1, 1], 0.5), rel=1e-6)
    # closed form: every anchor has exactly one positive (its pair partner)
    s = z @ z.T / 0.5
    partner = [1, 0, 3, 2]
    per_anchor = [
        -(s[i, partner[i]] - torch.logsumexp(s[i, [a for a in range(4) if a != i]], 0))
        for i in range(4)
    ]
    assert loss.item() == pytest.approx(
        0.5 / 0.07 * torch.stack(per_anchor).mean().item(), rel=1e-6
    )


def test_supcon_skips_anchors_without_positives():
    z = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    loss, anchors = supcon_loss(z, torch.tensor([0, 0, 1]), temperature=0.1)
    assert anchors == 2
    assert loss.item() == pytest.approx(_hand_supcon(z.tolist(), [0, 0, 1], 0.1), rel=1e-5)
    paper, _ = supcon_loss(z, torch.tensor([0, 0, 1]), temperature=0.1, normalization="paper")
    expected = _hand_supcon(z.tolist(), [0, 0, 1], 0.1, base_tau=None)
    assert paper.item() == pytest.approx(expected, rel=1e-5)
    assert paper.item() == pytest.approx(loss.item() * 3 / 2 * 0.07 / 0.1, rel=1e-5)


@pytest.mark.parametrize("labels", [[1], [0, 1, 2]])
def test_supcon_without_positive_pairs_is_zero_with_zero_gradient(labels):
    z = torch.randn(len(labels), 5, requires_grad=True)
    loss, anchors = supcon_loss(F.normalize(z, dim=1), torch.tensor(labels), 0.1)
    assert anchors == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@settings(max_examples=20, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=8),
    seed=st.integers(0, 1000),
    tau=st.floats(0.05, 2.0),
)
def test_supcon_matches_loops_and_is_batch_order_invariant(labels, seed, tau):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(len(labels), 3, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor(labels)
    loss, anchors = supcon_loss(z, y, tau)
    if anchors == 0:
        assert loss.item() == 0.0
        return
    assert loss.item() == pytest.approx(_hand_supcon(z.tolist(), labels, tau), rel=1e-4)
    perm = torch.randperm(len(labels), generator=g)
    assert supcon_loss(z[perm], y[perm], tau)[0].item() == pytest.approx(loss.item(), rel=1e-5)


def test_supcon_gradient_pulls_positives_together():
    z = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [0.1, -1.0]]))
    y = torch.tensor([0, 0, 1, 1])
    cos_before = F.cosine_similarity(z[0], z[1], dim=0).item()
    for _ in range(30):  # plain gradient descent
        (grad,) = torch.autograd.grad(supcon_loss(F.normalize(z, dim=1), y, 0.1)[0], z)
        with torch.no_grad():
            z -= 0.1 * grad
    assert F.cosine_similarity(z[0], z[1], dim=0).item() > cos_before + 0.5


def test_projection_head_is_two_layer_and_unit_norm():
    head = ProjectionHead(16, 16, 128)
    z = head(torch.randn(5, 16))
    assert z.shape == (5, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert [type(m) for m in head.net] == [nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("schedule", ["parabolic", "linear", "step"])
def test_schedule_endpoints_and_monotone(schedule):
    ts = [i / 50 for i in range(51)]
    betas = [scmil_beta(t, schedule) for t in ts]
    assert betas[0] == 1.0 and betas[-1] == 0.0
    assert all(a >= b for a, b in pairwise(betas))
    assert scmil_beta(-1.0, schedule) == 1.0 and scmil_beta(2.0, schedule) == 0.0


def test_parabolic_and_step_values():
    assert scmil_beta(0.5, "parabolic") == pytest.approx(0.75)
    assert scmil_beta(0.5, "linear") == pytest.approx(0.5)
    assert scmil_beta(0.3, "step", switch_at=0.4) == 1.0
    assert scmil_beta(0.4, "step", switch_at=0.4) == 0.0


def test_on_train_step_end_follows_the_schedule():
    model = models.create("scmil-abmil", D, 2, **SMALL)
    assert float(model.beta) == 1.0
    model.on_train_step_end(1, 4)  # the trainer passes the number of completed steps
    assert float(model.beta) == pytest.approx(1 - (1 / 4) ** 2)
    model.on_train_step_end(4, 4)
    assert float(model.beta) == 0.0
    state = model.state_dict()
    fresh = models.create("scmil-abmil", D, 2, **SMALL)
    fresh.load_state_dict(state)
    assert float(fresh.beta) == 0.0  # the schedule position survives a checkpoint


def _batch(lengths, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), D, generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return {"features": x, "mask": mask, "label": torch.tensor(labels)}


def test_single_bag_gives_pure_cross_entropy():
    torch.manual_seed(0)
    model = models.create("scmil-abmil", D, 3, **SMALL).train()
    batch = _batch([5], [2])
    out = model(batch["features"])
    loss, logs = model.training_loss(batch, out, nn.CrossEntropyLoss())
    assert loss.item() == F.cross_entropy(out.logits, batch["label"]).item()
    assert logs["supcon_skipped"] == 1.0 and logs["supcon_anchors"] == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_mixes_supcon_and_ce_with_beta():
    torch.manual_seed(1)
    model = models.create("scmil-abmil", D, 2, **SMALL).eval()
    batch = _batch([4, 6, 3, 5], [0, 1, 0, 1])
    out = model(batch["features"], batch["mask"])
    model.on_train_step_end(5, 10)  # β = 1 − (5/10)² = 0.75
    loss, logs = model.training_loss(batch, out, nn.CrossEntropyLoss())
    ce = F.cross_entropy(out.logits, batch["label"]).item()
    z = model.project(out.embedding)
    sc = _hand_supcon(z.tolist(), [0, 1, 0, 1], 0.1)
    assert logs["scmil_beta"] == pytest.approx(0.75)
    assert loss.item() == pytest.approx(0.75 * sc + 0.25 * ce, rel=1e-5)
    assert logs["loss_supcon"] == pytest.approx(sc, rel=1e-5)


def test_gradient_flows_to_base_and_projection_and_beta_one_freezes_head():
    torch.manual_seed(2)
    model = models.create("scmil-abmil", D, 2, **SMALL).train()
    batch = _batch([4, 6, 3, 5], [0, 1, 0, 1])
    out = model(batch["features"], batch["mask"])
    loss, _ = model.training_loss(batch, out, nn.CrossEntropyLoss())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("base.head"):  # β_0 = 1: pure representation learning
            assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
        elif name.startswith("projection") or name.startswith("base.fc"):
            assert p.grad.abs().sum() > 0, name


def test_padded_batch_loss_equals_per_bag_computation():
    torch.manual_seed(3)
    model = models.create("scmil-abmil", D, 2, **SMALL).eval()
    batch = _batch([4, 7, 2, 5], [1, 0, 1, 0], seed=4)
    model.on_train_step_end(1, 6)
    out = model(batch["features"], batch["mask"])
    loss, _ = model.training_loss(batch, out, nn.CrossEntropyLoss())
    singles = [model(batch["features"][b : b + 1, :n]) for b, n in enumerate([4, 7, 2, 5])]
    logits = torch.cat([o.logits for o in singles])
    emb = torch.cat([o.embedding for o in singles])
    torch.testing.assert_close(out.embedding, emb, atol=1e-5, rtol=1e-5)
    sc, _ = supcon_loss(model.project(emb), batch["label"], 0.1)
    beta = float(model.beta)
    expected = beta * sc + (1 - beta) * F.cross_entropy(logits, batch["label"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_scmil_abmil_is_gated_clam_abmil_and_generic_takes_any_base():
    model = models.create("scmil-abmil", 1024, 2)
    assert isinstance(model, SCMIL) and isinstance(model.base, ABMIL)
    assert model.base.pool.gated and model.embed_dim == 512
    assert model.projection.net[-1].out_features == 128 and model.temperature == 0.1
    assert model.training_preset["batch_size"] == 8
    assert model.training_preset["sampling"] == "balanced"
    generic = models.create("scmil", D, 2, base="aem-mha", base_kwargs={"inner_dim": 16})
    assert generic.embed_dim == 16 and generic.permutation_invariant
    out = generic(torch.randn(2, 5, D))
    assert out.logits.shape == (2, 2) and out.embedding.shape == (2, 16)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"schedule": "cosine"}, r"unknown schedule, got 'cosine'.*parabolic"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"switch_at": 1.5}, r"switch_at must be in \[0, 1\]"),
        ({"base": "scmil-abmil"}, "already an SC-MIL model"),
    ],
)
def test_invalid_arguments_are_explained(kwargs, pattern):
    with pytest.raises(MilkitError, match=pattern):
        models.create("scmil", D, 2, **kwargs)


def _toy_task(n_bags: int = 16, seed: int = 0):
    """Bags of 3-8 instances; class-1 bags hold one instance shifted along the first axis."""
    from milkit.data.datasets import InMemoryBagDataset

    g = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n_bags):
        bag = torch.randn(int(torch.randint(3, 9, (1,), generator=g)), D, generator=g)
        if i % 2:
            bag[0, 0] += 4.0
        bags.append(bag)
        labels.append(i % 2)
    return InMemoryBagDataset(bags, labels)


@pytest.mark.slow
def test_trains_through_the_trainer_with_the_official_preset():
    from milkit.training.config import TrainConfig
    from milkit.training.trainer import Trainer

    torch.manual_seed(0)
    config = TrainConfig.for_model("scmil-abmil", "official", epochs=3, progress=False, seed=0)
    assert config.batch_size == 8 and config.sampling == "balanced" and config.optimizer == "adam"
    model = models.create("scmil-abmil", D, 2, **SMALL)
    result = Trainer(model, config).fit(_toy_task())
    last = result.history[-1]
    assert math.isfinite(last["train_loss"]) and "train_loss_supcon" in last
    assert float(model.beta) == 0.0  # schedule ran to its end over the trainer's total steps
