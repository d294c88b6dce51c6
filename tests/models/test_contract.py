"""The aggregator contract (docs/architecture.md §6), checked for EVERY registered model.

Each case builds the model at a tiny size (``in_dim`` 32, N ≤ 40) so the whole suite stays fast;
models whose defaults are large get small overrides in ``SMALL``. Parameters that legitimately
receive no gradient (EMA teachers, EMA-updated queries) are listed in ``NO_GRAD`` by name prefix
and must have ``requires_grad == False``.
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
from torch import nn

from milkit import models
from milkit.errors import MilkitError, ModelError
from milkit.models.base import MILModel, MILOutput

IN_DIM, NUM_CLASSES = 32, 3

# Per-model small overrides (default: none). Keys are registered names.
SMALL: dict[str, dict] = {
    "transmil": {"dim": 32, "heads": 2, "num_landmarks": 8},
    "mhim-transmil": {"dim": 32, "heads": 2, "num_landmarks": 8},
    # 8×8 regions of a ≤ 40-token bag hold one token each (order then cannot matter): use 2×2.
    "r2t-abmil": {"region_num": 2},
    # The pure-PyTorch selective scan at d_model 512 / d_state 16 costs seconds per case.
    "mambamil": {"dim": 32, "d_state": 4, "attn_dim": 16},
    "mambamil-bimamba": {"dim": 32, "d_state": 4, "attn_dim": 16},
    "mambamil-mamba": {"dim": 32, "d_state": 4, "attn_dim": 16},
    # Without subtyping CLAM trains only the instance classifier of each bag's own class (the
    # others keep grad None, as in the official code); the gradient batch has no class-2 bag.
    "clam-sb": {"subtyping": True},
    "clam-mb": {"subtyping": True},
}

# Parameters without gradients by design, as fnmatch patterns over parameter names.
NO_GRAD: dict[str, list[str]] = {
    "mhim-abmil": ["teacher.*", "grn.queries"],
    "mhim-transmil": ["teacher.*", "grn.queries"],
}

NAMES = models.list_models()


def build(name: str) -> MILModel:
    torch.manual_seed(0)
    return models.create(name, IN_DIM, NUM_CLASSES, **SMALL.get(name, {}))


def bags(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (b, n, IN_DIM) and raster-order coords (b, n, 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, IN_DIM, generator=g)
    idx = torch.arange(n)
    coords = torch.stack([idx % 7, idx // 7], dim=-1).mul(256).expand(b, n, 2).clone()
    return x, coords


def check_attention(out: MILOutput, b: int, n: int, mask: torch.Tensor | None = None) -> None:
    if out.attention is None:
        assert out.attention_logits is None
        return
    att = out.attention
    assert att.shape[0] == b and att.shape[-1] == n and att.ndim in (2, 3), att.shape
    assert out.attention_logits is not None and out.attention_logits.shape == att.shape
    assert torch.isfinite(att).all()
    assert bool((att >= -1e-6).all())
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-4, rtol=1e-4)
    if mask is not None:
        pad = ~mask if att.ndim == 2 else (~mask)[:, None].expand_as(att)
        assert bool((att[pad] == 0).all()), "attention must be exactly 0 at padding"


@pytest.mark.parametrize("name", NAMES)
def test_output_fields_and_shapes(name):
    model = build(name).eval()
    x, coords = bags(2 if model.supports_padding else 1, 13)
    b = x.shape[0]
    with torch.no_grad():
        out = model(x, coords=coords)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (b, NUM_CLASSES)
    assert out.embedding.shape == (b, model.embed_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()
    check_attention(out, b, 13)
    if out.instance_logits is not None:
        assert out.instance_logits.shape == (b, 13, NUM_CLASSES)
        assert torch.isfinite(out.instance_logits).all()
    for key, value in out.aux_losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    b = 4 if model.supports_padding else 1
    x, coords = bags(b, 21, seed=1)
    batch = {
        "features": x,
        "mask": None,
        "coords": coords,
        "label": torch.tensor([0, 1, 0, 1][:b]),
        "slide_id": [f"s{i}" for i in range(b)],
    }
    out = model(x, coords=coords)
    loss, logs = model.training_loss(batch, out, nn.CrossEntropyLoss())
    assert loss.ndim == 0 and torch.isfinite(loss) and isinstance(logs, dict)
    loss.backward()
    allowed = NO_GRAD.get(name, [])
    for pname, param in model.named_parameters():
        if any(fnmatch.fnmatch(pname, pat) for pat in allowed):
            assert not param.requires_grad, f"{pname} is listed as gradient-free but trainable"
            assert param.grad is None
            continue
        assert param.requires_grad, f"{pname} is frozen but not listed in NO_GRAD[{name!r}]"
        assert param.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {pname}"
    model.on_train_step_end(1, 10)  # hooks must run after a step


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name):
    model = build(name).eval()
    x, coords = bags(1, 17, seed=2)
    with torch.no_grad():
        first, second = model(x, coords=coords), model(x, coords=coords)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    if first.attention is not None:
        torch.testing.assert_close(first.attention, second.attention, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_each_bag(name):
    model = build(name).eval()
    lengths = (9, 23)
    x, coords = bags(2, max(lengths), seed=3)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 7.5)  # padding content must not matter
    if not model.supports_padding:
        with pytest.raises(ValueError):
            model(x, mask, coords)
        return
    with torch.no_grad():
        out = model(x, mask, coords)
        check_attention(out, 2, max(lengths), mask)
        for i, n in enumerate(lengths):
            ref = model(x[i : i + 1, :n], coords=coords[i : i + 1, :n])
            torch.testing.assert_close(out.logits[i], ref.logits[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out.embedding[i], ref.embedding[0], atol=2e-5, rtol=1e-4)
            if ref.attention is not None:
                got = out.attention[i, ..., :n]
                torch.testing.assert_close(got, ref.attention[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_bag_raises(name):
    model = build(name).eval()
    b = 2 if model.supports_padding else 1
    x, coords = bags(b, 8, seed=4)
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[-1] = False
    with pytest.raises(ValueError, match=r"masked|padding|instance"):
        model(x, mask, coords)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_property(name):
    model = build(name).eval()
    x, coords = bags(1, 30, seed=5)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, coords=coords)
        out = model(x[:, perm], coords=coords[:, perm])
    if model.permutation_invariant:
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-4)
        if ref.attention is not None:
            torch.testing.assert_close(
                out.attention, ref.attention[..., perm], atol=2e-5, rtol=1e-4
            )
    else:  # documented order sensitivity: the output must actually change
        assert not torch.allclose(out.logits, ref.logits, atol=1e-6, rtol=0), (
            f"{name} claims permutation_invariant=False but ignores instance order"
        )


@pytest.mark.parametrize("name", NAMES)
def test_unknown_override_is_rejected(name):
    with pytest.raises(TypeError, match="accepted parameters"):
        models.create(name, IN_DIM, NUM_CLASSES, not_a_parameter=1)


@pytest.mark.parametrize("name", NAMES)
def test_errors_use_the_template_with_the_registered_name(name):
    # One template in models/: "<the name the user asked for>: <problem>", a MilkitError (the
    # CLI prints one line) that is still a TypeError/ValueError.
    with pytest.raises(ModelError, match=rf"^{re.escape(name)}: unknown parameter"):
        models.create(name, IN_DIM, NUM_CLASSES, not_a_parameter=1)
    model = build(name).eval()
    with pytest.raises(ModelError, match=rf"^{re.escape(name)}: x must have shape \(B, N, D\)"):
        model(torch.zeros(8, IN_DIM))
    with pytest.raises(ModelError, match=rf"^{re.escape(name)}: empty bag"):
        model(torch.zeros(1, 0, IN_DIM))


@pytest.mark.parametrize(
    ("name", "bad"),
    [("abmil-gated", {"init": "nope"}), ("mambamil-bimamba", {"act": "nope"}),
     ("transmil-sattention", {"init": "nope"}), ("clam-mb", {"size": "huge"}),
     ("scmil-abmil", {"temperature": 0.0}), ("aem-abmil", {"subsampling": 2.0})],
)  # fmt: skip
def test_constructor_errors_name_the_registered_variant(name, bad):
    # The class checks its arguments under its own first name; create() says the variant's.
    with pytest.raises(ModelError, match=rf"^{re.escape(name)}: ") as info:
        models.create(name, IN_DIM, NUM_CLASSES, **bad)
    assert isinstance(info.value, MilkitError) and isinstance(info.value, ValueError)
    assert str(info.value).count(":") >= 1 and not str(info.value).startswith("MambaMIL")


@pytest.mark.parametrize("name", NAMES)
def test_model_declares_dims(name):
    model = build(name)
    assert (model.in_dim, model.num_classes) == (IN_DIM, NUM_CLASSES)
    assert isinstance(model.embed_dim, int) and model.embed_dim > 0
