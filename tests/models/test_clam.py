"""CLAM-SB / CLAM-MB: equal to the official CLAM modules, instance clustering, smooth SVM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milkit import models
from milkit.errors import MilkitError
from milkit.models.clam import CLAM_RECIPE, smooth_top1_svm_loss
from milkit.models.registry import get_entry
from tests.conftest import SHARED_DATA

FIDELITY = SHARED_DATA / "fidelity"
DATA = Path(__file__).parent / "data"
CE = nn.CrossEntropyLoss()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("case", ["clam_sb_small_gated", "clam_sb_small_plain"])
def test_official_clam_sb_fixture_loads_and_agrees(case):
    """The official CLAM_SB state dict loads into clam-sb with strict=True (instance
    classifiers included) and reproduces logits and attention in float64."""
    meta_path = FIDELITY / f"{case}.json"
    if not meta_path.exists():
        pytest.skip(f"fidelity fixtures not available ({FIDELITY})")
    meta = json.loads(meta_path.read_text())
    tensors = _load(FIDELITY / meta["file"])
    state = {k: tensors["state." + k].double() for k in meta["state_keys"]}
    ctor = meta["constructor"]
    model = models.create(
        "clam-sb", 128, ctor["n_classes"], gate=ctor["gate"], size=ctor["size_arg"],
        dropout=ctor["dropout"],
    )  # fmt: skip
    model.load_state_dict(state, strict=True)
    model.double().eval()
    tol = meta["milkit"]["suggested_tolerance"]
    atol = next(v["atol"] for k, v in tol.items() if k.startswith("float64"))
    for bag in meta["inputs"]["bags"]:
        k = bag["key"].split(".")[-1]
        with torch.no_grad():
            out = model(tensors[bag["key"]].double()[None])
        for name in ("logits", "attention", "attention_logits"):
            torch.testing.assert_close(
                getattr(out, name), tensors[f"output.{name}.{k}"], atol=atol, rtol=0
            )


def _own_fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return _load(DATA / "clam_official.safetensors"), json.loads(
        (DATA / "clam_official.json").read_text()
    )


def _states(t: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    mb = {k[len("state.mb.") :]: v.double() for k, v in t.items() if k.startswith("state.mb.")}
    sb = {
        k: v for k, v in mb.items() if not k.startswith("classifiers.") and "attention_c" not in k
    }
    sb.update(
        {k[len("state.sb.") :]: v.double() for k, v in t.items() if k.startswith("state.sb.")}
    )
    return {"mb": mb, "sb": sb}


@pytest.mark.parametrize("variant", ["sb", "mb"])
@pytest.mark.parametrize("inst_loss", ["svm", "ce"])
@pytest.mark.parametrize("subtyping", [True, False])
def test_official_clam_outputs_and_instance_loss(variant, inst_loss, subtyping):
    """Official CLAM_SB/CLAM_MB (53e2409) in float64: logits, A_raw and the instance-level
    clustering loss (SmoothTop1SVM or CE, subtyping on/off) agree to float rounding."""
    t, meta = _own_fixture()
    c, d = meta["milkit"]["num_classes"], meta["milkit"]["in_dim"]
    model = models.create(f"clam-{variant}", d, c, inst_loss=inst_loss, subtyping=subtyping)
    model.load_state_dict(_states(t)[variant], strict=True)
    model.double().eval()
    tag = f"{inst_loss}.{'sub' if subtyping else 'nosub'}"
    checked = 0
    for i in range(4):
        x = t[f"input.x{i}"].double()[None]
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(
            out.logits[0], t[f"output.{variant}.logits.x{i}"][0], atol=1e-12, rtol=0
        )
        raw = out.attention_logits[0].reshape(-1, x.shape[1])
        torch.testing.assert_close(
            raw, t[f"output.{variant}.attention_logits.x{i}"], atol=1e-12, rtol=0
        )
        key = f"output.{variant}.instance_loss.{tag}.x{i}"
        if key in t:
            label = torch.tensor([meta["labels"][f"x{i}"]])
            batch = {"label": label, "mask": None, "features": x}
            with torch.no_grad():
                loss, logs = model.training_loss(batch, out, CE)
            torch.testing.assert_close(
                torch.tensor(logs["loss_instance"], dtype=torch.float64), t[key], atol=1e-12, rtol=0
            )
            expected = 0.7 * CE(out.logits, label) + 0.3 * t[key]
            torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
            checked += 1
    assert checked == 2


def test_official_clam_mb_float32_logits_documented():
    """Unedited CLAM_MB returns float32 logits; milkit's float64 logits differ by < 1e-7."""
    t, meta = _own_fixture()
    model = models.create("clam-mb", meta["milkit"]["in_dim"], meta["milkit"]["num_classes"])
    model.load_state_dict(_states(t)["mb"], strict=True)
    model.double().eval()
    with torch.no_grad():
        out = model(t["input.x3"].double()[None])
    delta = (out.logits[0] - t["output.mb_unedited.logits.x3"][0]).abs().max()
    assert 0 < delta < 1e-7


# ----------------------------------------------------------------------------- smooth SVM
def test_smooth_svm_hand_computed():
    scores = torch.tensor([[0.0, 1.5], [0.0, 1.5], [0.0, 8.0], [0.0, 8.0], [2.0, 1.0, -1.0]][:4])
    target = torch.tensor([1, 0, 1, 0])
    # smooth: tau*log(exp(-0.5) + 1), log(1 + exp(2.5)); hard (gap 8 >= log 1000): 0 and 9
    per_sample = [math.log(math.exp(-0.5) + 1), math.log(1 + math.exp(2.5)), 0.0, 9.0]
    loss = smooth_top1_svm_loss(scores, target)
    assert loss.item() == pytest.approx(sum(per_sample) / 4, abs=1e-6)
    three = torch.tensor([[2.0, 1.0, -1.0]])
    # x = [1 + 2 - 1, 0, 1 - 1 - 1] = [2, 0, -1]
    expected = math.log(math.exp(2) + math.exp(0) + math.exp(-1))
    assert smooth_top1_svm_loss(three, torch.tensor([1])).item() == pytest.approx(
        expected, abs=1e-6
    )


@given(d=st.floats(-20, 20), y=st.integers(0, 1))
@settings(max_examples=50, deadline=None)
def test_smooth_svm_depends_on_score_difference_only(d, y):
    """The margin form [0, d] gives the same loss as any [a, a + d] (shift invariance)."""
    a = torch.tensor([[0.0, d], [3.7, 3.7 + d]], dtype=torch.float64)
    loss = [smooth_top1_svm_loss(a[i : i + 1], torch.tensor([y])) for i in range(2)]
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-9)
    assert loss[0].item() >= 0


def test_smooth_svm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores must be"):
        smooth_top1_svm_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        smooth_top1_svm_loss(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- clustering
def _captured_rows(model, x, label, **kw):
    """Rows fed to each instance classifier during training_loss (eval mode)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        clf.register_forward_hook(lambda m, inp, out, c=c: seen.__setitem__(c, inp[0].detach()))
        for c, clf in enumerate(model.instance_classifiers)
    ]
    out = model(x)
    _loss, logs = model.training_loss(
        {"label": torch.tensor([label]), "features": x, **kw}, out, CE
    )
    for h in hooks:
        h.remove()
    return out, seen, logs


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_topk_selection_on_planted_bag(name):
    """Planted bag: instances 0-3 and 10-13 are pushed to the highest attention, 20-27 to the
    lowest; the in-class classifier sees exactly those 8 + 8 embeddings (top first)."""
    torch.manual_seed(0)
    model = models.create(name, 16, 2, k_sample=8, dropout=0.0).eval()
    x = torch.randn(1, 30, 16) * 0.1
    # the input direction that raises the attention of class 1's branch (MB) / the branch (SB)
    xg = x.clone().requires_grad_(True)
    model.attention_net[3](model.attention_net[:3](xg))[0, :, -1].sum().backward()
    direction = xg.grad[0].mean(0)
    direction = direction / direction.norm()
    planted_top = [0, 1, 2, 3, 10, 11, 12, 13]
    planted_bottom = list(range(20, 28))
    x[0, planted_top] += 3.0 * direction
    x[0, planted_bottom] -= 3.0 * direction
    out, seen, _ = _captured_rows(model, x, label=1)
    raw = out.attention_logits[0] if name == "clam-sb" else out.attention_logits[0, 1]
    assert set(raw.topk(8).indices.tolist()) == set(planted_top)
    assert set((-raw).topk(8).indices.tolist()) == set(planted_bottom)
    with torch.no_grad():
        h = model.attention_net[:3](x)[0]
    rows = seen[1]
    assert rows.shape == (16, model.hidden)
    top_rows = {tuple(r.tolist()) for r in h[planted_top]}
    bottom_rows = {tuple(r.tolist()) for r in h[planted_bottom]}
    assert {tuple(r.tolist()) for r in rows[:8]} == top_rows
    assert {tuple(r.tolist()) for r in rows[8:]} == bottom_rows
    assert 0 not in seen  # no subtyping: the out-of-class classifier is not used


def test_subtyping_uses_out_of_class_top_k_as_negatives():
    torch.manual_seed(1)
    model = models.create("clam-mb", 16, 3, subtyping=True, dropout=0.0).eval()
    x = torch.randn(1, 25, 16)
    out, seen, _logs = _captured_rows(model, x, label=2)
    assert seen[2].shape[0] == 16 and seen[0].shape[0] == 8 and seen[1].shape[0] == 8
    with torch.no_grad():
        h = model.attention_net[:3](x)[0]
    for c in (0, 1):  # each out-of-class classifier sees the top 8 of ITS OWN branch
        top = out.attention_logits[0, c].topk(8).indices
        torch.testing.assert_close(seen[c], h[top])


def test_only_in_class_instance_classifier_gets_gradient_without_subtyping():
    """As in the official code: unused instance classifiers keep grad None (Adam skips them)."""
    torch.manual_seed(2)
    model = models.create("clam-sb", 16, 3).train()
    x = torch.randn(1, 20, 16)
    out = model(x)
    loss, _ = model.training_loss({"label": torch.tensor([1]), "features": x}, out, CE)
    loss.backward()
    assert model.instance_classifiers[1].weight.grad is not None
    assert model.instance_classifiers[0].weight.grad is None
    assert model.instance_classifiers[2].weight.grad is None


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_padded_batch_training_loss_equals_per_bag(name):
    """Padding (even with attention-grabbing content) is never selected; the batch loss is the
    mean of the per-bag losses; train mode (cached h) equals eval mode (recomputed h)."""
    torch.manual_seed(3)
    model = models.create(name, 16, 2, subtyping=True, dropout=0.0)
    lengths = [12, 30]
    x = torch.randn(2, 30, 16)
    mask = torch.arange(30)[None] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 50.0)
    labels = torch.tensor([1, 0])
    for mode in ("eval", "train"):
        getattr(model, mode)()
        out = model(x, mask)
        batch = {"label": labels, "mask": mask, "features": x}
        loss, _logs = model.training_loss(batch, out, CE)
        per_bag = []
        for i, n in enumerate(lengths):
            xi = x[i : i + 1, :n]
            oi = model(xi)
            li, _ = model.training_loss({"label": labels[i : i + 1], "features": xi}, oi, CE)
            per_bag.append(li)
        torch.testing.assert_close(loss, torch.stack(per_bag).mean(), atol=1e-5, rtol=1e-5)


def test_small_bag_policies():
    torch.manual_seed(4)
    x = torch.randn(1, 5, 16)
    label = torch.tensor([1])
    with pytest.raises(MilkitError, match="fewer than k_sample = 8"):
        m = models.create("clam-sb", 16, 2, small_bags="error").eval()
        m.training_loss({"label": label, "features": x}, m(x), CE)
    skip = models.create("clam-sb", 16, 2, small_bags="skip").eval()
    out = skip(x)
    loss, logs = skip.training_loss({"label": label, "features": x}, out, CE)
    assert logs["instance_skipped"] == 1.0
    torch.testing.assert_close(loss, 0.7 * CE(out.logits, label))
    clip = models.create("clam-sb", 16, 2).eval()  # default: k = n for this bag
    clip.load_state_dict(skip.state_dict())
    k5 = models.create("clam-sb", 16, 2, k_sample=5).eval()
    k5.load_state_dict(skip.state_dict())
    got, _ = clip.training_loss({"label": label, "features": x}, clip(x), CE)
    want, _ = k5.training_loss({"label": label, "features": x}, k5(x), CE)
    torch.testing.assert_close(got, want)


def test_bag_weight_and_no_inst_cluster():
    torch.manual_seed(5)
    x = torch.randn(1, 20, 16)
    label = torch.tensor([0])
    m = models.create("clam-sb", 16, 2, bag_weight=0.4).eval()
    out = m(x)
    loss, logs = m.training_loss({"label": label, "features": x}, out, CE)
    assert loss.item() == pytest.approx(
        0.4 * logs["loss_ce"] + 0.6 * logs["loss_instance"], rel=1e-5
    )
    off = models.create("clam-sb", 16, 2, inst_cluster=False).eval()
    out = off(x)
    loss, logs = off.training_loss({"label": label, "features": x}, out, CE)
    torch.testing.assert_close(loss, CE(out.logits, label))
    assert "loss_instance" not in logs


def test_training_loss_needs_its_own_train_forward():
    m = models.create("clam-sb", 16, 2).train()
    x = torch.randn(1, 20, 16)
    out = m(x)
    m.training_loss({"label": torch.tensor([0]), "features": x}, out, CE)
    with pytest.raises(MilkitError, match="latest training-mode forward"):
        m.training_loss({"label": torch.tensor([0]), "features": x}, out, CE)


def test_defaults_structure_and_attention_shapes():
    sb = models.create("clam-sb", 1024, 2)
    assert (sb.gate, sb.size, sb.k_sample, sb.inst_loss, sb.bag_weight, sb.subtyping) == (
        True, "small", 8, "svm", 0.7, False,
    )  # fmt: skip
    assert sb.attention_net[2].p == 0.25 and sb.attn_dropout == 0.25
    assert sb.attention_net[3].attention_a[0].out_features == 256
    assert (
        models.create("clam-sb", 1024, 2, size="big").attention_net[3].attention_c.in_features
        == 384
    )
    assert models.create("clam-sb", 64, 2, dropout=0.0).attn_dropout == 0.0
    mb = models.create("clam-mb", 32, 4).eval()
    out = mb(torch.randn(2, 9, 32))
    assert out.attention.shape == (2, 4, 9) and out.embedding.shape == (2, 4 * 512)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 4))
    # class c's logit is w_c · m_c + b_c with m_c the pooling of branch c only
    x = torch.randn(1, 9, 32)
    out = mb(x)
    m = torch.bmm(out.attention, mb.attention_net[:3](x))[0]
    for c, clf in enumerate(mb.classifiers):
        torch.testing.assert_close(out.logits[0, c], clf(m[c])[0])


def test_instance_logits_are_classifier_margins():
    torch.manual_seed(6)
    m = models.create("clam-sb", 16, 3, dropout=0.0).eval()
    x = torch.randn(1, 11, 16)
    out = m(x)
    h = m.attention_net[:3](x)[0]
    for c, clf in enumerate(m.instance_classifiers):
        z = clf(h)
        torch.testing.assert_close(out.instance_logits[0, :, c], z[:, 1] - z[:, 0])


def test_reset_classifier():
    m = models.create("clam-mb", 16, 2)
    m.reset_classifier(5)
    out = m.eval()(torch.randn(1, 10, 16))
    assert out.logits.shape == (1, 5) and out.attention.shape == (1, 5, 10)
    assert len(m.instance_classifiers) == 5
    s = models.create("clam-sb", 16, 2, gate=False)
    s.reset_classifier(3)
    assert s.eval()(torch.randn(1, 10, 16)).logits.shape == (1, 3)


def test_registry_names_and_preset():
    assert get_entry("clam_sb").name == "clam-sb"
    assert get_entry("CLAM_MB").name == "clam-mb"
    with pytest.raises(KeyError, match="Did you mean: clam-sb"):
        get_entry("clamsb")
    for name in ("clam-sb", "clam-mb"):
        assert get_entry(name).cls.training_preset == CLAM_RECIPE
    assert CLAM_RECIPE["lr"] == 2e-4 and CLAM_RECIPE["min_epochs"] == 52
    from milkit.training.config import TrainConfig

    cfg = TrainConfig.for_model("clam_mb", "official")  # every preset key is a valid option
    assert (cfg.sampling, cfg.monitor, cfg.patience, cfg.scheduler) == (
        "balanced", "val_loss", 20, "none",
    )  # fmt: skip


def test_same_seed_builds_the_official_initial_weights():
    """Modules are created in CLAM's order with PyTorch's default init (CLAM since 2024-04), so
    the fixture's construction seeds rebuild the official weights (stored rounded to float16)."""
    t, meta = _own_fixture()
    d, c = meta["milkit"]["in_dim"], meta["milkit"]["num_classes"]
    for name, seed, variant in [("clam-mb", 211, "mb"), ("clam-sb", 212, "sb")]:
        torch.manual_seed(seed)
        state = models.create(name, d, c).state_dict()
        stored = {
            k[len(f"state.{variant}.") :]: v
            for k, v in t.items()
            if k.startswith(f"state.{variant}.")
        }
        assert len(stored) >= 4
        for key, value in stored.items():
            torch.testing.assert_close(state[key].half().float(), value.float(), atol=1e-3, rtol=0)
