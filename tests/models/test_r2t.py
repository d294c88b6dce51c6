"""R2T-MIL: region partition, EPEG equivalence, CR-MSA equations, per-bag batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit import models
from milkit.models.layers.region_attention import (
    CrossRegionAttention,
    InnerAttention,
    region_grid,
    regions_to_sequence,
    sequence_to_regions,
)
from milkit.models.r2t import R2TEncoder

SMALL = {"dim": 16, "n_heads": 2, "crmsa_heads": 2, "attn_dim": 8, "region_num": 2}


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 400), num=st.integers(1, 9))
def test_partition_then_reverse_restores_sequence(length, num):
    grid = region_grid(length, num)
    assert grid.side % num == 0 and grid.side**2 >= length and (grid.side - num) ** 2 < length
    x = torch.randn(2, length, 3)
    regions = sequence_to_regions(x, grid)
    assert regions.shape == (2, num * num, grid.size**2, 3)
    torch.testing.assert_close(regions_to_sequence(regions, grid), x, rtol=0, atol=0)


def test_partition_layout_is_row_major_square_cut_into_regions():
    grid = region_grid(100, 4)  # H = ⌈√100⌉ = 10 -> 12, M = 3, 44 zero tokens appended
    assert (grid.side, grid.size, grid.pad) == (12, 3, 44)
    seq = torch.arange(1, 101, dtype=torch.float32).view(1, 100, 1)
    regions = sequence_to_regions(seq, grid)[0, :, :, 0]
    for gy, gx, my, mx in [(0, 0, 0, 0), (1, 2, 2, 1), (3, 3, 2, 2), (0, 1, 1, 0)]:
        index = (gy * 3 + my) * 12 + gx * 3 + mx
        expected = index + 1 if index < 100 else 0
        assert regions[gy * 4 + gx, my * 3 + mx].item() == expected


def test_auto_region_num_keeps_regions_small_for_long_bags():
    assert region_grid(10_000, "auto").num == 8  # official R for ordinary bags
    grid = region_grid(100_000, "auto")
    assert (grid.num, grid.side, grid.size) == (20, 320, 16)
    with pytest.raises(ValueError, match="region_num"):
        region_grid(10, 0)


def test_epeg_attention_equals_official_conv_on_logits():
    """softmax(E + DWConv_{k×1}(E)) v with the official Conv2d == our modified-query SDPA."""
    torch.manual_seed(0)
    attn = InnerAttention(12, 3, proj_drop=0.0, epeg_k=5).double().eval()
    torch.nn.init.normal_(attn.pe.weight)
    torch.nn.init.normal_(attn.pe.bias)  # nonzero bias: cancels in the softmax
    x = torch.randn(4, 9, 12, dtype=torch.float64)
    logits = attn.epeg_logits(x)  # official: E + pe(E), pe = Conv2d(h, h, (5, 1), groups=h)
    _, _, v = attn.qkv(x).view(4, 9, 3, 3, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(4, 9, 12))
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_epeg_conv_runs_along_the_query_axis():
    attn = InnerAttention(4, 1, proj_drop=0.0, epeg_k=3).double()
    with torch.no_grad():
        attn.pe.weight.zero_()
        attn.pe.weight[0, 0, 0, 0] = 1.0  # out[i, j] = E[i - 1, j]
        attn.pe.bias.zero_()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    e = attn.epeg_logits(x)  # E + Conv2d(E) with the official (k, 1) kernel
    with torch.no_grad():
        attn.pe.weight.zero_()
    plain = attn.epeg_logits(x)
    shifted = torch.cat([torch.zeros_like(plain[..., :1, :]), plain[..., :-1, :]], dim=-2)
    torch.testing.assert_close(e, plain + shifted)


def test_crmsa_matches_hand_computation():
    torch.manual_seed(1)
    dim, k_reps = 4, 2
    cr = CrossRegionAttention(dim, 1, region_num=2, crmsa_k=k_reps, proj_drop=0.0).double()
    x = torch.randn(1, 13, dim, dtype=torch.float64)  # H = 4, M = 2: 4 regions of 4 tokens
    z = torch.cat([x[0], torch.zeros(3, dim, dtype=torch.float64)])  # 16 tokens, 3 zeros
    regions = [[(gy * 2 + my) * 4 + gx * 2 + mx for my in range(2) for mx in range(2)]
               for gy in range(2) for gx in range(2)]  # fmt: skip
    phi = cr.phi.detach()
    reps = torch.zeros(k_reps, 4, dim, dtype=torch.float64)
    for w, idx in enumerate(regions):
        s = z[idx] @ phi  # (P, K)
        for k in range(k_reps):
            reps[k, w] = (s[:, k].softmax(0)[:, None] * z[idx]).sum(0)
    attended = cr.attn(reps)  # MHSA over regions, per representative
    expected = torch.zeros(16, dim, dtype=torch.float64)
    for w, idx in enumerate(regions):
        s = z[idx] @ phi
        mm = (s - s.min(0).values) / (s.max(0).values - s.min(0).values + 1e-8)
        comb = s.softmax(1)
        for p, tok in enumerate(idx):
            for k in range(k_reps):
                expected[tok] += attended[k, w] * mm[p, k] * comb[p, k]
    torch.testing.assert_close(cr(x)[0], expected[:13], rtol=1e-10, atol=1e-10)


def test_batch_of_bags_equals_each_bag_and_never_mixes_bags():
    torch.manual_seed(2)
    model = models.create("r2t-abmil", 8, 3, **SMALL).eval()
    x = torch.randn(3, 30, 8)
    mask = torch.rand(3, 30) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        out = model(x, mask)
        for i in range(3):
            ref = model(x[i : i + 1, mask[i]])
            torch.testing.assert_close(out.logits[i], ref.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.attention[i, mask[i]], ref.attention[0])
        same = torch.randn(2, 30, 8)
        both = model(same)  # equal lengths, no mask: one batched call
        torch.testing.assert_close(both.logits[1], model(same[1:]).logits[0])
    assert bool((out.attention[~mask] == 0).all())


def test_order_sensitive_once_regions_hold_several_tokens():
    torch.manual_seed(3)
    model = models.create("r2t-abmil", 8, 3, **SMALL).eval()
    x = torch.randn(1, 40, 8)
    perm = torch.randperm(40)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, model(x[:, perm]).logits, atol=1e-5)


def test_encoder_plug_in_mode_and_options():
    torch.manual_seed(4)
    enc = R2TEncoder(16, n_heads=2, crmsa_heads=1, region_num="auto", crmsa_mlp=True,
                     all_shortcut=True, epeg_k=3)  # fmt: skip
    x = torch.randn(2, 50, 16)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 20:] = False
    out = enc(x, mask)
    assert out.shape == (2, 50, 16) and bool((out[1, 20:] == 0).all())
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    with pytest.raises(ValueError, match="region_num"):
        R2TEncoder(16, region_num=-1)


def test_official_init_and_training_preset():
    model = models.create("r2t-abmil", 8, 2, **SMALL)
    conv = model.encoder.layers[0].attn.attn.pe
    assert torch.count_nonzero(conv.bias) == 0 and conv.weight.std() > 0
    assert model.pool.proj.bias is None and model.pool.score.bias is None  # DAttention: no bias
    assert model.training_preset["lr"] == 2e-4
    assert model.training_preset["scheduler"] == "cosine-epoch"  # official: per-epoch cosine


def test_training_preset_is_a_valid_train_config():
    from milkit.training.config import TrainConfig

    cfg = TrainConfig.for_model("r2t-abmil", "official")
    assert (cfg.optimizer, cfg.lr, cfg.scheduler, cfg.epochs) == ("adam", 2e-4, "cosine-epoch", 200)


@pytest.mark.parametrize("name", ["r2t-abmil", "mhim-abmil", "mhim-transmil"])
def test_official_presets_step_the_cosine_per_epoch_like_cosine_annealing_lr(name):
    """MHIM-MIL and R2T-MIL main.py: CosineAnnealingLR(T_max=num_epoch, eta_min=0) stepped once
    per epoch (before: milkit stepped the cosine per iteration). The LR of every optimiser step
    equals the official one."""
    from milkit.training.config import TrainConfig
    from milkit.training.trainer import _cosine_epoch_lambda

    cfg = TrainConfig.for_model(name, "official", epochs=7)
    assert cfg.scheduler == "cosine-epoch"
    steps_per_epoch = 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    official = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, 0)
    factor = _cosine_epoch_lambda(steps_per_epoch, cfg.epochs, 0, 0.0)
    for epoch in range(cfg.epochs):
        for it in range(steps_per_epoch):
            step = epoch * steps_per_epoch + it
            assert abs(cfg.lr * factor(step) - opt.param_groups[0]["lr"]) < 1e-15
        official.step()
    # other models keep their presets (per-step cosine or none)
    assert TrainConfig.for_model("aem-mha", "official").scheduler == "cosine"
