"""AEM: the entropy term against hand computations, λ = 0 baseline, subsampling, the wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milkit import models
from milkit.errors import MilkitError
from milkit.models.aem import AEM, attention_entropy_term, subsample_instances
from milkit.models.base import MILModel, MILOutput
from milkit.models.registry import _REGISTRY, register_aggregator

D = 16


def _hand_term(logits_1d: list[float]) -> float:
    """Σ p log p of a softmax, in plain Python floats."""
    m = max(logits_1d)
    exps = [math.exp(v - m) for v in logits_1d]
    total = sum(exps)
    return sum((e / total) * math.log(e / total) for e in exps)


def _padded(lengths: list[int], d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), d, generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 123.0)  # junk padding must not matter
    return x, mask


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    heads=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 10_000),
)
def test_entropy_term_equals_hand_computation(lengths, heads, seed):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    shape = (len(lengths), n) if heads == 0 else (len(lengths), heads, n)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    pad = ~mask if heads == 0 else ~mask[:, None, :]
    junk = logits.masked_fill(pad, 1e4)  # padding values are ignored
    term = attention_entropy_term(junk, mask)
    for b, nb in enumerate(lengths):
        if heads == 0:
            expected = _hand_term(logits[b, :nb].tolist())
        else:  # official mha: sum over heads and instances / #heads
            expected = sum(_hand_term(logits[b, h, :nb].tolist()) for h in range(heads)) / heads
        assert term[b].item() == pytest.approx(expected, abs=1e-5)


def test_entropy_term_bounds_and_padding_gradient():
    logits = torch.zeros(1, 6, requires_grad=True)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    term = attention_entropy_term(logits, mask)
    assert term.item() == pytest.approx(-math.log(4), abs=1e-6)  # uniform over 4 real: -log 4
    term.sum().backward()
    assert torch.equal(logits.grad[0, 4:], torch.zeros(2))
    peaked = torch.tensor([[50.0, 0.0, 0.0]])
    assert attention_entropy_term(peaked, None).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["aem-mha", "aem-abmil"])
@pytest.mark.parametrize("lengths", [[7], [7, 4, 5]])
def test_loss_is_ce_plus_lambda_times_hand_term(name, lengths):
    torch.manual_seed(0)
    model = models.create(name, D, 3, inner_dim=16, lamda=0.37).eval()
    x, mask = _padded(lengths)
    mask_in = mask if len(lengths) > 1 else None
    out = model(x, mask_in)
    labels = torch.tensor([0, 2, 1][: len(lengths)])
    loss, logs = model.training_loss({"label": labels}, out, nn.CrossEntropyLoss())
    ce = F.cross_entropy(out.logits, labels)
    logits = out.attention_logits.double()
    per_bag = []
    for b, nb in enumerate(lengths):
        if logits.ndim == 2:
            per_bag.append(_hand_term(logits[b, :nb].tolist()))
        else:
            h = logits.shape[1]
            per_bag.append(sum(_hand_term(logits[b, i, :nb].tolist()) for i in range(h)) / h)
    expected = ce.item() + 0.37 * sum(per_bag) / len(per_bag)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert logs["aem_entropy"] == pytest.approx(0.37 * sum(per_bag) / len(per_bag), abs=1e-6)


@pytest.mark.parametrize("name", ["aem-mha", "aem-abmil"])
def test_lambda_zero_is_exactly_cross_entropy(name):
    torch.manual_seed(1)
    model = models.create(name, D, 2, inner_dim=16, lamda=0.0)
    x, mask = _padded([9, 3])
    out = model.train()(x, mask)
    labels = torch.tensor([1, 0])
    loss, _ = model.training_loss({"label": labels}, out, nn.CrossEntropyLoss())
    assert torch.equal(loss, F.cross_entropy(out.logits, labels) + 0.0)
    assert loss.item() == F.cross_entropy(out.logits, labels).item()


def test_mha_matches_torch_multihead_attention():
    """The 8-head query pool equals torch's reference MHA (separate q/k/v weights) + LayerNorm,
    also for a padded batch (torch: key_padding_mask)."""
    torch.manual_seed(2)
    model = models.create("aem-mha", D, 2, inner_dim=32).eval()
    x, mask = _padded([11, 6])
    out = model(x, mask)
    pool = model.pool
    h = model.reduce(x).transpose(0, 1)  # (N, B, E) for the functional API
    q = pool.query.expand(1, 2, 32)
    attn_out, weights = F.multi_head_attention_forward(
        q, h, h, 32, 8,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.out_proj.weight, out_proj_bias=pool.out_proj.bias,
        training=False, key_padding_mask=~mask, need_weights=True,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        average_attn_weights=False,
    )  # fmt: skip
    z = pool.norm(attn_out[0])
    torch.testing.assert_close(out.embedding, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention, weights[:, :, 0, :], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, model.head(z))
    assert out.attention_logits.shape == (2, 8, 11)
    torch.testing.assert_close(out.attention_logits.softmax(-1), out.attention)


def test_mha_defaults_follow_official_code():
    model = models.create("aem-mha", 1024, 4)
    assert model.reduce[0].bias is None and model.reduce[0].in_features == 1024
    assert model.pool.num_heads == 8 and model.embed_dim == 512
    assert model.pool.norm.eps == 1e-6 and model.pool.dropout.p == 0.1
    assert model.pool.scale == pytest.approx(1 / math.sqrt(512 / 8))
    assert model.pool.query.abs().max().item() < 1e-4  # N(0, 1e-6²) init
    assert model.lamda == 0.1 and model.subsampling == 1.0
    assert model.training_preset["optimizer"] == "adamw"
    assert model.training_preset["epochs"] == 50


def test_aem_abmil_matches_gated_attention_by_hand():
    torch.manual_seed(3)
    model = models.create("aem-abmil", D, 2, inner_dim=12, attn_dim=5).eval()
    assert model.reduce[0].bias is None
    x = torch.randn(1, 6, D)
    out = model(x)
    h = torch.relu(x[0] @ model.reduce[0].weight.T)
    w, bias = model.pool.proj.weight, model.pool.proj.bias
    v = torch.tanh(h @ w[:5].T + bias[:5])
    u = torch.sigmoid(h @ w[5:].T + bias[5:])
    e = (v * u) @ model.pool.score.weight[0] + model.pool.score.bias[0]
    a = torch.softmax(e, 0)
    torch.testing.assert_close(out.attention_logits[0], e, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.embedding[0], a @ h, atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    ratio=st.floats(0.01, 1.0),
    padded=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_subsampling_keeps_exactly_floor_r_n(lengths, ratio, padded, seed):
    if not padded:
        lengths = [lengths[0]] * len(lengths)
    x, mask = _padded(lengths, d=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(x.shape[1])[None, :, None].expand(len(lengths), -1, 2)
    x_sub, mask_sub, index, coords_sub = subsample_instances(
        x, mask if padded else None, ratio, coords, generator=g
    )
    for b, nb in enumerate(lengths):
        k = max(1, int(ratio * nb))  # the official `int(subsampling * N)`, at least one
        assert int(mask_sub[b].sum()) == k
        kept = index[b, :k]
        assert bool((kept < nb).all())  # only real instances
        assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == k
        assert torch.equal(x_sub[b, :k], x[b, kept])
        assert torch.equal(coords_sub[b, :k, 0], kept)
    assert x_sub.shape[1] == max(max(1, int(ratio * n)) for n in lengths)


def test_subsampling_only_in_training_and_output_keeps_full_shape():
    torch.manual_seed(4)
    model = models.create("aem-abmil", D, 2, inner_dim=8, subsampling=0.5)
    x, mask = _padded([10, 7])
    out = model.train()(x, mask)
    assert out.attention.shape == (2, 10)
    assert (out.attention > 0).sum(-1).tolist() == [5, 3]
    assert torch.allclose(out.attention.sum(-1), torch.ones(2))
    assert not bool(out.attention[1, 7:].any())
    out_eval = model.eval()(x, mask)
    assert (out_eval.attention > 0).sum(-1).tolist() == [10, 7]
    # dropped instances' logits are "no weight": softmax of them reproduces the attention
    torch.testing.assert_close(out.attention_logits.softmax(-1) * mask, out.attention)


def test_gradient_reaches_every_parameter():
    model = models.create("aem-mha", D, 2, inner_dim=16, lamda=0.5).train()
    x, mask = _padded([5, 8])
    out = model(x, mask)
    loss, _ = model.training_loss({"label": torch.tensor([0, 1])}, out, nn.CrossEntropyLoss())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pool.query.grad.abs().sum() > 0


def test_minimising_aem_term_raises_attention_entropy():
    torch.manual_seed(5)
    model = models.create("aem-abmil", D, 2, inner_dim=8, lamda=1.0).eval()
    x = torch.randn(1, 20, D) * 3
    with torch.no_grad():
        model.pool.score.weight.mul_(30.0)  # start from peaked attention
    params = list(model.parameters())
    before = -attention_entropy_term(model(x).attention_logits, None).item()
    for _ in range(40):  # plain gradient descent on the AEM term alone
        grads = torch.autograd.grad(model(x).aux_losses["aem_entropy"], params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p -= 0.002 * g
    after = -attention_entropy_term(model(x).attention_logits, None).item()
    assert after > before + 1.0 and after <= math.log(20) + 1e-5


def test_generic_wrapper_adds_term_to_base_output():
    torch.manual_seed(6)
    wrapped = models.create(
        "aem", D, 2, base="abmil-gated", base_kwargs={"fc_dim": 8, "attn_dim": 4}, lamda=0.2
    ).eval()
    assert isinstance(wrapped, AEM) and wrapped.permutation_invariant
    assert wrapped.training_preset["lr"] == 1e-4 and wrapped.training_preset["epochs"] == 50
    x, mask = _padded([6, 4])
    base_out = wrapped.base(x, mask)
    out = wrapped(x, mask)
    torch.testing.assert_close(out.logits, base_out.logits)
    expected = 0.2 * attention_entropy_term(base_out.attention_logits, mask).mean()
    torch.testing.assert_close(out.aux_losses["aem_entropy"], expected)


class _NoAttention(MILModel):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, in_dim
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x, mask=None, coords=None):
        z = x.mean(1)
        return MILOutput(self.head(z), z)


@pytest.fixture
def no_attention_model():
    register_aggregator("test-no-attention")(_NoAttention)
    yield "test-no-attention"
    _REGISTRY.pop("test-no-attention")


class _DetachedAttention(_NoAttention):
    def forward(self, x, mask=None, coords=None):
        out = super().forward(x, mask, coords)
        logits = x.sum(-1).detach()
        return MILOutput(out.logits, out.embedding, logits.softmax(-1), logits)


@pytest.fixture
def detached_attention_model():
    register_aggregator("test-detached-attention")(_DetachedAttention)
    yield "test-detached-attention"
    _REGISTRY.pop("test-detached-attention")


def test_wrapper_rejects_attention_without_gradient_in_training(detached_attention_model):
    model = models.create("aem", D, 2, base=detached_attention_model)
    x = torch.randn(1, 3, D)
    with pytest.raises(MilkitError, match=r"carry no gradient.*abmil-gated"):
        model.train()(x)
    assert "aem_entropy" in model.eval()(x).aux_losses  # evaluation still works
    assert (
        "aem_entropy"
        in models.create("aem", D, 2, base=detached_attention_model, lamda=0)(x).aux_losses
    )  # λ = 0 (the baseline) needs no gradient


def _check_autocast(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    model = models.create("aem-mha", D, 2, inner_dim=16).to(device).eval()
    x, mask = _padded([9, 5])
    x, mask = x.to(device), mask.to(device)
    ref = model(x, mask).aux_losses["aem_entropy"]
    with torch.autocast(device, dtype=dtype):
        out = model.train()(x, mask)
    model.eval()
    term = out.aux_losses["aem_entropy"]
    assert term.dtype == torch.float32 and torch.isfinite(term)
    assert term.item() == pytest.approx(ref.item(), abs=5e-3)
    term.backward()
    assert torch.isfinite(model.pool.query.grad).all()


def test_entropy_term_is_float32_under_cpu_autocast():
    _check_autocast("cpu", torch.bfloat16)


@pytest.mark.gpu
def test_entropy_term_under_cuda_autocast():
    _check_autocast("cuda", torch.float16)


def test_wrapper_rejects_base_without_attention(no_attention_model):
    model = models.create("aem", D, 2, base=no_attention_model)
    with pytest.raises(MilkitError, match=r"returns no attention_logits.*abmil-gated"):
        model(torch.randn(1, 3, D))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"subsampling": 0.0}, r"subsampling must be in \(0, 1\], got 0.0"),
        ({"subsampling": 1.5}, r"subsampling must be in \(0, 1\].*keep 80%"),
        ({"lamda": float("nan")}, "lamda must be a finite number"),
    ],
)
def test_invalid_arguments_are_explained(kwargs, pattern):
    with pytest.raises(MilkitError, match=pattern):
        models.create("aem-mha", D, 2, **kwargs)


def test_wrapper_refuses_double_regularisation():
    with pytest.raises(MilkitError, match="already carries the AEM regulariser"):
        models.create("aem", D, 2, base="aem-mha")


def test_fully_masked_bag_raises():
    model = models.create("aem-mha", D, 2, inner_dim=8)
    x, mask = _padded([3, 2])
    mask[1] = False
    with pytest.raises(ValueError, match=r"bag\(s\) \[1\] are fully masked"):
        model(x, mask)


def test_official_preset_is_accepted_by_the_trainer():
    from milkit.training.config import TrainConfig

    for name in ("aem-mha", "aem-abmil", "aem"):
        config = TrainConfig.for_model(name, "official")
        assert (config.optimizer, config.lr, config.weight_decay) == ("adamw", 1e-4, 1e-5)
        assert (config.epochs, config.batch_size, config.scheduler) == (50, 1, "cosine")
