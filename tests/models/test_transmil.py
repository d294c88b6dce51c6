"""TransMIL and the Nyström attention layer: reference math, masks, per-bag equality."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from milkit import models
from milkit.models.layers.nystrom import NystromAttention


def _reference_nystrom(layer: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """Unmasked Nyström attention written out as in the reference (explicit matrices)."""
    b, n, _ = x.shape
    m, h = layer.num_landmarks, layer.heads
    pad = (m - n % m) % m
    x = torch.nn.functional.pad(x, (0, 0, pad, 0))
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in layer.to_qkv(x).chunk(3, -1))
    q = q * layer.scale
    seg = (n + pad) // m
    q_l = q.reshape(b, h, m, seg, -1).mean(3)
    k_l = k.reshape(b, h, m, seg, -1).mean(3)
    a1 = (q @ k_l.transpose(-1, -2)).softmax(-1)
    a2 = (q_l @ k_l.transpose(-1, -2)).softmax(-1)
    a3 = (q_l @ k.transpose(-1, -2)).softmax(-1)
    z = a2.transpose(-1, -2) / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
    eye = torch.eye(m)
    for _ in range(layer.pinv_iterations):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    out = (a1 @ z) @ (a3 @ v) + layer.res_conv(v)
    full = (a1 @ z @ a3)[:, :, pad:, pad:]
    return layer.to_out(rearrange(out, "b h n d -> b n (h d)"))[:, pad:], full


@pytest.mark.parametrize("n", [5, 8, 13])
def test_nystrom_matches_reference(n):
    torch.manual_seed(n)
    layer = NystromAttention(16, heads=2, dim_head=8, num_landmarks=4, residual_conv_kernel=3)
    x = torch.randn(1, n, 16)
    out, row = layer(x, query_row=2)
    ref, full = _reference_nystrom(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(row, full[:, :, 2], atol=1e-4, rtol=1e-4)


def test_nystrom_attention_row_chunking():
    torch.manual_seed(0)
    layer = NystromAttention(8, heads=2, dim_head=4, num_landmarks=3)
    x = torch.randn(1, 10, 8)
    q = torch.randn(1, 2, 12, 4)
    k, q_l, k_l = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    inv = torch.randn(1, 2, 3, 3)
    whole = layer._attention_row(q, k, q_l, k_l, inv, 1, None, None)
    chunked = layer._attention_row(q, k, q_l, k_l, inv, 1, None, None, chunk=5)
    torch.testing.assert_close(whole, chunked)
    assert layer(x)[1] is None


def test_nystrom_mask_blocks_padded_content():
    torch.manual_seed(1)
    layer = NystromAttention(16, heads=2, dim_head=8, num_landmarks=4).eval()
    x = torch.randn(2, 11, 16)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[0, 3] = False
    out1, row1 = layer(x, mask, query_row=0)
    x2 = x.clone()
    x2[~mask] = 1e3 * torch.randn(int((~mask).sum()), 16)
    out2, row2 = layer(x2, mask, query_row=0)
    torch.testing.assert_close(out1[mask], out2[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(row1[:, :, :], row2, atol=1e-5, rtol=1e-4)
    assert bool((row1.transpose(1, 2)[~mask] == 0).all())


def _small(**kw):
    return models.create("transmil", 12, 3, dim=16, heads=2, num_landmarks=8, **kw).eval()


def test_transmil_forward_shapes_and_attention():
    torch.manual_seed(0)
    model = _small()
    out = model(torch.randn(2, 10, 12))
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 16)
    assert out.attention.shape == (2, 2, 10) and out.attention_logits.shape == (2, 2, 10)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 2))
    assert bool((out.attention >= 0).all())


def test_transmil_padded_batch_equals_each_bag():
    torch.manual_seed(3)
    model = _small()
    bags = [torch.randn(1, 7, 12), torch.randn(1, 17, 12)]
    x = torch.zeros(2, 17, 12)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    x[0, :7], mask[0, :7] = bags[0][0], True
    x[1], mask[1] = bags[1][0], True
    x[0, 7:] = 50.0
    out = model(x, mask)
    for i, bag in enumerate(bags):
        ref = model(bag)
        n = bag.shape[1]
        torch.testing.assert_close(out.logits[i], ref.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.attention[i, :, :n], ref.attention[0], atol=1e-5, rtol=1e-4)
    assert bool((out.attention[0, :, 7:] == 0).all())


def test_transmil_square_padding_folds_repeated_tokens():
    # N = 5 -> 3 × 3 grid, the first 4 tokens are repeated; attention stays over 5 instances.
    model = _small()
    out = model(torch.randn(1, 5, 12))
    assert out.attention.shape == (1, 2, 5)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 2))


def test_transmil_official_sizes():
    model = models.create("transmil", 1024, 2)
    attn = model.layer1.attn
    assert (attn.heads, attn.dim_head, attn.num_landmarks, attn.pinv_iterations) == (8, 64, 256, 6)
    assert attn.res_conv.kernel_size == (33, 1) and model.head.in_features == 512
    assert [c.kernel_size for c in model.pos_layer.children()] == [(7, 7), (5, 5), (3, 3)]
    assert math.isclose(attn.to_out[1].p, 0.1)


def test_transmil_is_order_sensitive():
    torch.manual_seed(0)
    model = _small()
    x = torch.randn(1, 9, 12)
    perm = torch.randperm(9)
    assert not torch.allclose(model(x).logits, model(x[:, perm]).logits, atol=1e-6)


def test_transmil_rejects_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        models.create("transmil", 8, 2, dim=10, heads=3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["abmil-gated", "transmil", "mhim-transmil"])
def test_cuda_matches_cpu(name):
    torch.manual_seed(0)
    model = models.create(
        name,
        12,
        3,
        **({} if name == "abmil-gated" else {"dim": 16, "heads": 2, "num_landmarks": 8}),
    ).eval()
    x = torch.randn(2, 37, 12)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    ref = model(x, mask)
    out = model.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out.attention.cpu(), ref.attention, atol=1e-4, rtol=1e-3)
