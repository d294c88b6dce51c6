"""ABMIL and AttentionPool against hand computations of Ilse et al.'s equations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit import models
from milkit.models.abmil import ABMIL
from milkit.models.clam import CLAM_RECIPE
from milkit.models.layers.attention_pool import AttentionPool


def _set(linear: torch.nn.Linear, weight: list, bias: list | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_plain_attention_matches_hand_computation():
    # M = 2, L = 2, N = 3: e_i = w^T tanh(V h_i) + biases, a = softmax(e), z = Σ a_i h_i.
    pool = AttentionPool(2, 2, gated=False)
    _set(pool.proj, [[1.0, 0.0], [0.0, 2.0]], [0.0, 0.5])
    _set(pool.score, [[1.0, -1.0]], [0.25])
    h = [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]]
    e = [math.tanh(a) - math.tanh(2 * b + 0.5) + 0.25 for a, b in h]
    s = sum(math.exp(v) for v in e)
    a = [math.exp(v) / s for v in e]
    z = [sum(a[i] * h[i][d] for i in range(3)) for d in range(2)]
    out = pool(torch.tensor([h]))
    torch.testing.assert_close(out.logits, torch.tensor([e]))
    torch.testing.assert_close(out.attention, torch.tensor([a]))
    torch.testing.assert_close(out.embedding, torch.tensor([z]))


def test_gated_attention_matches_hand_computation():
    pool = AttentionPool(2, 1, gated=True)
    # Fused rows: [V; U]
    _set(pool.proj, [[1.0, 1.0], [0.5, -1.0]], [0.1, -0.2])
    _set(pool.score, [[2.0]], [0.0])
    h = [[1.0, 2.0], [-1.0, 0.5]]
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    e = [2.0 * math.tanh(x + y + 0.1) * sig(0.5 * x - y - 0.2) for x, y in h]
    s = sum(math.exp(v) for v in e)
    out = pool(torch.tensor([h]))
    torch.testing.assert_close(out.logits, torch.tensor([e]))
    torch.testing.assert_close(out.attention, torch.tensor([[math.exp(v) / s for v in e]]))


def test_abmil_ilse_preset_and_full_model_equations():
    torch.manual_seed(0)
    model = models.create("abmil-ilse", 6, 2).eval()
    assert model.pool.attn_dim == 128 and model.embed_dim == 500 and not model.pool.gated
    x = torch.randn(1, 5, 6)
    fc, pool = model.fc[0], model.pool
    h = torch.relu(x[0] @ fc.weight.T + fc.bias)
    e = torch.tanh(h @ pool.proj.weight.T + pool.proj.bias) @ pool.score.weight.T
    e = (e + pool.score.bias).squeeze(-1)
    a = torch.softmax(e, 0)
    z = a @ h
    out = model(x)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.attention_logits[0], e)
    torch.testing.assert_close(out.embedding[0], z)
    torch.testing.assert_close(out.logits[0], z @ model.head.weight.T + model.head.bias)


def test_clam_layout_defaults():
    gated = models.create("abmil-gated", 1024, 3)
    plain = models.create("abmil", 1024, 3)
    assert gated.pool.gated and not plain.pool.gated
    assert gated.fc[0].out_features == 512 and gated.pool.attn_dim == 256
    assert gated.pool.proj.out_features == 512  # fused tanh + sigmoid branches
    assert [m.p for m in gated.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]
    # PyTorch default init, as CLAM since 2024-04-06 (d613a3d removed initialize_weights):
    # non-zero biases; Xavier (zero biases) is init="xavier" and abmil-dattention's (MHIM/RRT).
    assert float(gated.fc[0].bias.detach().abs().sum()) > 0.0
    assert float(models.create("abmil", 8, 2, init="xavier").fc[0].bias.abs().sum()) == 0.0
    dattention = models.create("abmil-dattention", 1024, 2)
    assert float(dattention.fc[0].bias.detach().abs().sum()) == 0.0
    assert ABMIL.training_preset["lr"] == 2e-4
    assert ABMIL.training_preset is CLAM_RECIPE  # one copy of the recipe, min_epochs 52 included


def test_multi_branch_concatenates():
    model = models.create("abmil", 8, 2, branches=3, fc_dim=4).eval()
    out = model(torch.randn(2, 7, 8))
    assert out.embedding.shape == (2, 12) and out.attention.shape == (2, 3, 7)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 3))


def test_no_embedding_layer():
    model = models.create("abmil", 8, 2, fc_dim=None, attn_dim=4)
    assert isinstance(model.fc, torch.nn.Identity) and model.embed_dim == 8


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init must be"):
        models.create("abmil", 8, 2, init="he")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), pad=st.integers(1, 6), gated=st.booleans(), seed=st.integers(0, 99))
def test_padding_gives_zero_weight_and_same_result(n, pad, gated, seed):
    torch.manual_seed(seed)
    model = models.create("abmil", 4, 2, fc_dim=6, attn_dim=3, gated=gated).eval()
    x = torch.randn(1, n, 4)
    padded = torch.cat([x, 1e4 * torch.randn(1, pad, 4)], dim=1)
    mask = torch.arange(n + pad)[None] < n
    ref, out = model(x), model(padded, mask)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert bool((out.attention[0, n:] == 0).all())
    torch.testing.assert_close(out.attention[:, :n], ref.attention)


def test_clam_state_dict_maps_onto_fused_gated_pool():
    # A CLAM_SB "small" state-dict written by hand (key names of CLAM's model_clam.py).
    from milkit.models.abmil import state_dict_from_clam

    torch.manual_seed(0)
    clam = {
        "attention_net.0.weight": torch.randn(6, 8),
        "attention_net.0.bias": torch.randn(6),
        "attention_net.3.attention_a.0.weight": torch.randn(4, 6),
        "attention_net.3.attention_a.0.bias": torch.randn(4),
        "attention_net.3.attention_b.0.weight": torch.randn(4, 6),
        "attention_net.3.attention_b.0.bias": torch.randn(4),
        "attention_net.3.attention_c.weight": torch.randn(1, 4),
        "attention_net.3.attention_c.bias": torch.randn(1),
        "classifiers.weight": torch.randn(2, 6),
        "classifiers.bias": torch.randn(2),
        "instance_classifiers.0.weight": torch.randn(2, 6),
    }
    model = models.create("abmil-gated", 8, 2, fc_dim=6, attn_dim=4).eval()
    model.load_state_dict(state_dict_from_clam(clam))
    x = torch.randn(1, 5, 8)
    h = torch.relu(x[0] @ clam["attention_net.0.weight"].T + clam["attention_net.0.bias"])
    a = torch.tanh(
        h @ clam["attention_net.3.attention_a.0.weight"].T
        + clam["attention_net.3.attention_a.0.bias"]
    )
    b = torch.sigmoid(
        h @ clam["attention_net.3.attention_b.0.weight"].T
        + clam["attention_net.3.attention_b.0.bias"]
    )
    e = (a * b) @ clam["attention_net.3.attention_c.weight"].T + clam[
        "attention_net.3.attention_c.bias"
    ]
    z = torch.softmax(e[:, 0], 0) @ h
    expected = z @ clam["classifiers.weight"].T + clam["classifiers.bias"]
    torch.testing.assert_close(model(x).logits[0], expected)
    with pytest.raises(KeyError, match="not a CLAM"):
        state_dict_from_clam({"fc.weight": torch.zeros(1)})
