"""MambaMIL and its mixers: SR reordering, mamba-ssm parameter names/init, per-bag padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit import models
from milkit.models.layers import mamba_block
from milkit.models.layers.mamba_block import (
    BiMamba,
    Mamba,
    SRMamba,
    sr_order,
    sr_unorder,
    ssm_a,
)

SMALL = {"dim": 16, "d_state": 4, "expand": 2, "attn_dim": 8}


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 60), rate=st.integers(1, 12))
def test_sr_order_is_columnwise_and_invertible(length, rate):
    x = torch.arange(length, dtype=torch.float64).view(1, 1, length) + 1  # 0 marks padding
    ordered = sr_order(x, rate)
    rows = math.ceil(length / rate)
    expected = [r * rate + c + 1 for c in range(rate) for r in range(rows)]
    expected = [v if v <= length else 0 for v in expected]
    assert ordered.flatten().tolist() == expected
    torch.testing.assert_close(sr_unorder(ordered, rate, length), x, rtol=0, atol=0)


def test_parameter_names_and_mamba_ssm_init():
    torch.manual_seed(0)
    mixer = SRMamba(16, d_state=4, rate=3)
    names = set(dict(mixer.named_parameters()))
    official = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight"}
    official |= {"dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    second = {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight"}
    second |= {"dt_proj_b.bias", "A_b_log", "D_b"}
    assert names == official | second
    assert "conv1d_b.weight" not in dict(Mamba(16, d_state=4).named_parameters())
    assert mixer.dt_rank == 1 and mixer.d_inner == 32  # ⌈16/16⌉, expand 2
    torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1.0, 5.0).repeat(32, 1))
    torch.testing.assert_close(mixer.D_b, torch.ones(32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert bool((dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all())
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound


def _correctly_rounded_a(a_log: torch.Tensor) -> torch.Tensor:
    """−exp(a) rounded once to float32, from Python's double exp (platform independent)."""
    values = [-math.exp(float(v)) for v in a_log.detach().float().flatten()]
    return torch.from_numpy(np.array(values, dtype=np.float64).astype(np.float32)).view_as(a_log)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-4.0, 4.0, width=16), min_size=1, max_size=64))
def test_ssm_a_is_the_correctly_rounded_float32(values):
    """A = −exp(A_log) in float32, rounded once: the same A on every platform. Torch's float32
    CPU exp is 1 ulp off for some inputs, e.g. log 7 in float16 (the fidelity fixtures' A_log),
    which moved float64 MambaMIL outputs by 8e-10 against the official run on another machine."""
    for dtype in (torch.float16, torch.float32, torch.float64):
        a_log = torch.tensor(values, dtype=torch.float64).to(dtype).view(-1, 1)
        a = ssm_a(a_log)
        assert a.dtype == torch.float32
        assert torch.equal(a, _correctly_rounded_a(a_log))


def test_mixer_scans_with_the_correctly_rounded_a(monkeypatch):
    """The mixer's A is ``ssm_a``: log 7 (float16) and log(1..16) in the scan of a float64 run."""
    log7 = torch.tensor(1.9462890625, dtype=torch.float64)  # float16(log 7)
    assert float(ssm_a(log7.view(1, 1))) == -7.002653121948242  # torch's float32 exp: 7.0026526
    torch.manual_seed(1)
    mixer = Mamba(16, d_state=16, backend="ref").double()
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(torch.arange(1, 17.0)).half().double().repeat(32, 1))
        mixer.A_log[:, 6] = log7
    seen = {}
    original = mamba_block.selective_scan

    def spy(u, delta, A, *args, **kwargs):
        seen["A"] = A
        return original(u, delta, A, *args, **kwargs)

    monkeypatch.setattr(mamba_block, "selective_scan", spy)
    mixer(torch.randn(1, 5, 16, dtype=torch.float64))
    assert torch.equal(seen["A"], _correctly_rounded_a(mixer.A_log))


def test_official_init_resets_mixer_linears_and_mamba_ssm_init_keeps_them():
    torch.manual_seed(0)
    official = models.create("mambamil", 8, 2, **SMALL)
    kept = models.create("mambamil", 8, 2, init="mamba-ssm", **SMALL)
    assert torch.count_nonzero(official.layers[0][1].dt_proj.bias) == 0  # official quirk
    dt = torch.nn.functional.softplus(kept.layers[0][1].dt_proj_b.bias)
    assert bool((dt <= 0.1 + 1e-7).all())
    with pytest.raises(ValueError, match="init must be"):
        models.create("mambamil", 8, 2, init="kaiming")
    with pytest.raises(ValueError, match="mixer must be one of"):
        models.create("mambamil", 8, 2, mixer="s4")


@pytest.mark.parametrize("cls", [Mamba, BiMamba, SRMamba])
def test_mixer_pytorch_scan_equals_sequential_reference(cls):
    torch.manual_seed(1)
    mixer = cls(16, d_state=4).double()
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    fast = mixer(x)
    mixer.backend = "ref"
    torch.testing.assert_close(fast, mixer(x), rtol=1e-10, atol=1e-10)


def test_mamba_is_causal_and_srmamba_is_not():
    torch.manual_seed(2)
    x = torch.randn(1, 20, 16)
    x2 = x.clone()
    x2[0, 12] += 1.0
    uni, sr = Mamba(16, d_state=4), SRMamba(16, d_state=4, rate=4)
    with torch.no_grad():
        torch.testing.assert_close(uni(x)[0, :12], uni(x2)[0, :12], rtol=0, atol=0)
        assert not torch.allclose(sr(x)[0, :12], sr(x2)[0, :12])


@pytest.mark.parametrize("name", ["mambamil", "mambamil-mamba", "mambamil-bimamba"])
def test_interleaved_padding_equals_per_bag_and_attention(name):
    torch.manual_seed(3)
    model = models.create(name, 8, 3, **SMALL).eval()
    x = torch.randn(3, 12, 8)
    mask = torch.rand(3, 12) > 0.4
    mask[:, 0] = True
    with torch.no_grad():
        out = model(x, mask)
        for i in range(3):
            ref = model(x[i : i + 1, mask[i]])
            torch.testing.assert_close(out.logits[i], ref.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.attention[i, mask[i]], ref.attention[0])
    assert bool((out.attention[~mask] == 0).all())
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(Mamba, {}), (BiMamba, {}), (SRMamba, {"rate": 7}), (SRMamba, {"rate": 5, "bias": True})],
)
def test_low_memory_mixer_equals_plain_path_outputs_and_gradients(cls, kwargs):
    """Chunked mixer (conv + scan state carried, checkpointed chunks) == plain path, fwd + bwd.

    301 tokens in chunks of 64: the last chunk is partial, SR padding falls inside a chunk.
    """
    torch.manual_seed(6)
    plain = cls(16, d_state=4, chunk_size=None, **kwargs).double()
    low = cls(16, d_state=4, chunk_size=64, **kwargs).double()
    low.load_state_dict(plain.state_dict())
    x = torch.randn(2, 301, 16, dtype=torch.float64, requires_grad=True)
    x_low = x.detach().clone().requires_grad_()
    out, out_low = plain(x), low(x_low)
    torch.testing.assert_close(out_low, out, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (out_low * weight).sum().backward()
    torch.testing.assert_close(x_low.grad, x.grad, rtol=1e-10, atol=1e-12)
    # A_log / D enter the scan in float32 on both paths, so parameter grads agree to fp32 level
    grads = dict(plain.named_parameters())
    for name, p in low.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(low(x), out, rtol=1e-10, atol=1e-12)


def _bytes_saved_for_backward(module, x):
    """Bytes of distinct storages autograd keeps for backward (checkpointed chunks keep their
    own saved tensors out of these hooks, as they are recomputed in backward)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_low_memory_mixer_keeps_only_o_n_d_model_for_backward():
    """Plain path: a dozen (d_inner, N) and (d_inner, N, d_state)-block activations per branch;
    low-memory path: a few (N, d_model) tensors (chunk inputs, SR gather) plus small states."""
    torch.manual_seed(8)
    length, d_model = 2000, 16
    x = torch.randn(1, length, d_model, requires_grad=True)
    plain = _bytes_saved_for_backward(SRMamba(d_model, d_state=4, chunk_size=None), x)
    low = _bytes_saved_for_backward(SRMamba(d_model, d_state=4, chunk_size=100), x)
    assert low <= 4 * length * d_model * 4  # measured ~2.5 float32 (N, d_model) tensors
    assert plain > 20 * low


@pytest.mark.parametrize("name", ["mambamil", "mambamil-bimamba"])
def test_low_memory_model_equals_plain_model(name):
    """Layer checkpointing + chunked mixers give the plain model's logits and gradients."""
    torch.manual_seed(7)
    plain = models.create(name, 8, 2, chunk_size=None, **SMALL)  # the model runs in float32
    low = models.create(name, 8, 2, chunk_size=50, **SMALL)
    low.load_state_dict(plain.state_dict())
    x = torch.randn(1, 300, 8)
    for model in (plain, low):
        loss = torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([1]))
        loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(low(x).logits, plain(x).logits, rtol=1e-5, atol=1e-6)
    grads = dict(plain.named_parameters())
    for pname, p in low.named_parameters():
        torch.testing.assert_close(p.grad, grads[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)


@pytest.mark.slow
def test_training_step_runs_on_long_bag_with_chunked_scan(monkeypatch):
    """A bag longer than one scan block trains (recomputing blocks in backward)."""
    from milkit.models.layers import selective_scan

    monkeypatch.setattr(selective_scan, "_MAX_BLOCK", 128)  # several blocks ...
    monkeypatch.setattr(selective_scan, "_PLAIN_AUTOGRAD_ELEMENTS", 0)  # ... all recomputed
    torch.manual_seed(4)
    model = models.create("mambamil", 8, 2, **SMALL)
    x = torch.randn(1, 500, 8)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1]))
    loss.backward()
    grad = model.layers[0][1].A_b_log.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.gpu
def test_mamba_mixer_matches_mamba_ssm_kernels_on_same_weights():
    """Load mamba-ssm's ``Mamba`` weights into ours (strict names) and compare outputs/grads."""
    mamba_simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    torch.manual_seed(5)
    theirs = mamba_simple.Mamba(d_model=64, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(64, d_state=16, d_conv=4, expand=2, backend="torch")
    ours.load_state_dict({k: v.cpu() for k, v in theirs.state_dict().items()}, strict=True)
    x = torch.randn(2, 300, 64)
    x_cuda = x.cuda().requires_grad_()
    x_cpu = x.clone().requires_grad_()
    out_cuda, out_cpu = theirs(x_cuda), ours(x_cpu)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-3, atol=1e-3)
    out_cuda.square().sum().backward()
    out_cpu.square().sum().backward()
    torch.testing.assert_close(x_cuda.grad.cpu(), x_cpu.grad, rtol=5e-3, atol=5e-3)
    ours_cuda = Mamba(64, d_state=16, backend="cuda").cuda()  # our module on the kernel path
    ours_cuda.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours_cuda(x.cuda()), theirs(x.cuda()), rtol=1e-4, atol=1e-4)


def test_training_preset_is_a_valid_train_config():
    from milkit.training.config import TrainConfig

    cfg = TrainConfig.for_model("mambamil", "official")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs) == ("adam", 2e-4, 1e-5, 200)
    # CLAM's EarlyStopping (which MambaMIL's loop uses) stops only when the 0-based epoch > 50,
    # and the official scripts pass --weighted_sample
    assert (cfg.patience, cfg.min_epochs, cfg.monitor) == (20, 52, "val_loss")
    assert cfg.sampling == "balanced"
