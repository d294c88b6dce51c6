"""DSMIL: equal to the official dsmil-wsi module; critical instance, 0.5/0.5 loss, padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milkit import models
from milkit.models.registry import get_entry

DATA = Path(__file__).parent / "data"
CE = nn.CrossEntropyLoss()


def _fixture() -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    t = load_file(str(DATA / "dsmil_official.safetensors"))
    return t, json.loads((DATA / "dsmil_official.json").read_text())


def _official_model(cfg_name: str) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    t, meta = _fixture()
    cfg = meta["configs"][cfg_name]
    prefix = f"state.{cfg_name}."
    state = {k[len(prefix) :]: v.double() for k, v in t.items() if k.startswith(prefix)}
    num_classes = 2 if cfg["out"] == 1 else cfg["out"]
    model = models.create(
        "dsmil", 64, num_classes, nonlinear=cfg["nonlinear"], passing_v=cfg["passing_v"]
    )
    model.load_state_dict(state, strict=True)
    return model.double().eval(), t, meta


@pytest.mark.parametrize("cfg_name", ["o1", "o3"])
def test_official_dsmil_fixture(cfg_name):
    """Official MILNet (80465ed) in float64: instance scores, bag scores, attention, bag
    embedding and the train_tcga.py loss agree to float rounding."""
    model, t, meta = _official_model(cfg_name)
    out_dim = meta["configs"][cfg_name]["out"]
    for i in range(len(meta["labels"][cfg_name])):
        x = t[f"input.x{i}"].double()[None]
        label = torch.tensor([meta["labels"][cfg_name][i]])
        with torch.no_grad():
            out = model(x)
            loss, _ = model.training_loss({"label": label, "mask": None}, out, CE)
        scores = out.logits[0, 1:] if out_dim == 1 else out.logits[0]
        inst = out.instance_logits[0, :, 1:] if out_dim == 1 else out.instance_logits[0]
        att = out.attention[0].reshape(out_dim, -1).T
        expected = {
            "bag": (scores, t[f"output.{cfg_name}.bag.x{i}"][0]),
            "instance": (inst, t[f"output.{cfg_name}.instance.x{i}"]),
            "attention": (att, t[f"output.{cfg_name}.attention.x{i}"]),
            "embedding": (out.embedding[0], t[f"output.{cfg_name}.embedding.x{i}"].flatten()),
            "loss": (loss, t[f"output.{cfg_name}.loss.x{i}"]),
        }
        for name, (got, want) in expected.items():
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=f"{name} x{i}")


def test_same_seed_builds_the_official_initial_weights():
    """Creation order and train_tcga.py's orthogonal init reproduce the official weights."""
    t, meta = _fixture()
    for cfg_name, cfg in meta["configs"].items():
        torch.manual_seed(cfg["seed"])
        num_classes = 2 if cfg["out"] == 1 else cfg["out"]
        model = models.create(
            "dsmil", 64, num_classes, nonlinear=cfg["nonlinear"], passing_v=cfg["passing_v"]
        )
        for key, value in model.state_dict().items():
            if key.endswith("weight"):
                stored = t[f"state.{cfg_name}.{key}"].float()
                torch.testing.assert_close(value.half().float(), stored, atol=1e-3, rtol=0)


def test_critical_instance_is_argmax_of_instance_scores():
    """The query of the critical instance is q(x_m) with m = argmax_i c_i; its own attention
    logit <q_m, q_m>/√128 is therefore the diagonal entry of the Gram matrix."""
    torch.manual_seed(0)
    model = models.create("dsmil", 16, 3).eval()
    x = torch.randn(1, 25, 16)
    captured = []
    hook = model.b_classifier.q.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    scores = model.i_classifier(x)[0]  # (N, 3)
    critical = scores.argmax(0)
    torch.testing.assert_close(captured[1][0], x[0, critical])
    torch.testing.assert_close(out.instance_logits[0], scores)
    q = model.b_classifier.q(x[0])
    expected = (q @ q[critical].T).T / torch.tensor(128.0).sqrt()
    torch.testing.assert_close(out.attention_logits[0], expected)


def test_padding_never_becomes_the_critical_instance():
    torch.manual_seed(1)
    model = models.create("dsmil", 16, 2).eval()
    x = torch.randn(2, 20, 16)
    mask = torch.arange(20)[None] < torch.tensor([8, 20])[:, None]
    w = model.i_classifier.fc[0].weight[0]
    x[0, 8:] = 100.0 * w / w.norm()  # padding with the highest instance score
    with torch.no_grad():
        out = model(x, mask)
        ref = model(x[:1, :8])
    torch.testing.assert_close(out.logits[0], ref.logits[0])
    torch.testing.assert_close(out.attention[0, :8], ref.attention[0])
    assert (out.attention[0, 8:] == 0).all()


def test_losses_at_half_each_binary():
    """L = 0.5·BCE(s_bag, y) + 0.5·BCE(max_i c_i, y); for C = 2 this is also CE on [0, s]."""
    torch.manual_seed(2)
    model = models.create("dsmil", 16, 2).eval()
    x = torch.randn(1, 12, 16)
    y = torch.tensor([1])
    with torch.no_grad():
        out = model(x)
        loss, logs = model.training_loss({"label": y, "mask": None}, out, CE)
        s_bag = out.logits[0, 1]
        s_max = model.i_classifier(x)[0, :, 0].max()
    bce_bag = F.binary_cross_entropy_with_logits(s_bag, torch.tensor(1.0))
    bce_max = F.binary_cross_entropy_with_logits(s_max, torch.tensor(1.0))
    torch.testing.assert_close(loss, 0.5 * bce_bag + 0.5 * bce_max)
    assert logs["loss_bag"] == pytest.approx(bce_bag.item(), rel=1e-6)
    assert logs["loss_max"] == pytest.approx(bce_max.item(), rel=1e-6)
    torch.testing.assert_close(out.logits[0, 0], torch.tensor(0.0))
    torch.testing.assert_close(out.logits.softmax(-1)[0, 1], torch.sigmoid(s_bag))
    ce_model = models.create("dsmil", 16, 2, loss="ce").eval()
    ce_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        ce_loss, _ = ce_model.training_loss({"label": y, "mask": None}, ce_model(x), CE)
    torch.testing.assert_close(ce_loss, loss)


def test_multiclass_bce_one_hot_and_class_weights():
    torch.manual_seed(3)
    model = models.create("dsmil", 16, 3).eval()
    assert model.outputs == 3 and not model.negative_class
    x = torch.randn(2, 10, 16)
    y = torch.tensor([2, 0])
    weight = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        out = model(x)
        loss, _ = model.training_loss({"label": y, "mask": None}, out, nn.CrossEntropyLoss(weight))
        onehot = F.one_hot(y, 3).float()
        inst_max = out.instance_logits.max(1).values
        per_bag = 0.5 * F.binary_cross_entropy_with_logits(
            out.logits, onehot, reduction="none"
        ).mean(1)
        per_bag += 0.5 * F.binary_cross_entropy_with_logits(
            inst_max, onehot, reduction="none"
        ).mean(1)
    w = weight[y]
    torch.testing.assert_close(loss, (w * per_bag).sum() / w.sum())


def test_negative_class_layout_for_more_classes():
    model = models.create("dsmil", 16, 4, negative_class=True).eval()
    assert model.outputs == 3
    out = model(torch.randn(1, 6, 16))
    assert out.logits.shape == (1, 4) and out.attention.shape == (1, 3, 6)
    assert (out.logits[:, 0] == 0).all() and (out.instance_logits[..., 0] == 0).all()


@given(lengths=st.lists(st.integers(1, 15), min_size=2, max_size=4), seed=st.integers(0, 99))
@settings(max_examples=15, deadline=None)
def test_padded_batch_training_loss_equals_per_bag(lengths, seed):
    torch.manual_seed(seed)
    model = models.create("dsmil", 8, 2).eval()
    n = max(lengths)
    x = torch.randn(len(lengths), n, 8)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 30.0)
    y = torch.tensor([i % 2 for i in range(len(lengths))])
    with torch.no_grad():
        loss, _ = model.training_loss({"label": y, "mask": mask}, model(x, mask), CE)
        per_bag = [
            model.training_loss({"label": y[i : i + 1], "mask": None}, model(x[i : i + 1, :m]), CE)[
                0
            ]
            for i, m in enumerate(lengths)
        ]
    torch.testing.assert_close(loss, torch.stack(per_bag).mean(), atol=1e-5, rtol=1e-5)


def test_orthogonal_init_and_options():
    model = models.create("dsmil", 256, 2)
    w = model.b_classifier.q[0].weight  # (128, 256): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(128), atol=1e-5, rtol=0)
    assert all((b == 0).all() for n, b in model.named_parameters() if n.endswith("bias"))
    assert isinstance(model.b_classifier.v, nn.Identity)
    passing = models.create("dsmil", 32, 2, passing_v=True, nonlinear=False, dropout_v=0.3)
    assert isinstance(passing.b_classifier.q, nn.Linear)
    assert passing.b_classifier.v[0].p == 0.3 and passing.b_classifier.v[1].out_features == 32


def test_every_parameter_trains_and_reset_classifier():
    model = models.create("dsmil", 16, 2, passing_v=True).train()
    x = torch.randn(1, 9, 16)
    loss, _ = model.training_loss({"label": torch.tensor([1]), "mask": None}, model(x), CE)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(5)
    out = model.eval()(x)
    # the negative-class layout chosen at construction (C = 2) is kept: O = 5 - 1
    assert out.logits.shape == (1, 5) and out.embedding.shape == (1, 4 * 16)


def test_registry_and_preset():
    assert get_entry("DSMIL").name == "dsmil"
    preset = get_entry("dsmil").cls.training_preset
    assert (preset["lr"], preset["weight_decay"], preset["epochs"]) == (1e-4, 1e-3, 50)
    from milkit.training.config import TrainConfig

    cfg = TrainConfig.for_model("dsmil", "official")  # every preset key is a valid option
    assert (cfg.scheduler, cfg.min_lr, cfg.patience) == ("cosine-epoch", 5e-6, 11)
