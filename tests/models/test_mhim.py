"""MHIM-MIL: exact mask counts, EMA update, schedules, consistency loss, teacher init, v2."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit import models
from milkit.errors import MilkitError
from milkit.models.layers.mhim_masking import ceil_count, cosine_value, mhim_mask, vote_topk

SMALL_T = {"dim": 32, "heads": 2, "num_landmarks": 8}


def _valid(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None] < torch.tensor(lengths)[:, None]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
    ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
)
def test_single_masks_remove_exact_counts(lengths, ratio, seed):
    n = max(lengths)
    valid = _valid(lengths, n)
    scores = torch.rand(len(lengths), n, generator=torch.Generator().manual_seed(seed))
    n_real = valid.sum(1)
    for kind in ("r", "l"):
        kw = {"ratio_r": ratio} if kind == "r" else {"ratio_l": ratio}
        removed = mhim_mask(scores, valid, ratio_h=0.0, ratio_hr=1.0, **kw)
        expected = torch.tensor([math.ceil(ratio * k) for k in lengths])
        expected = torch.where(expected >= n_real, n_real - 1, expected)  # one is always kept
        assert removed.sum(1).tolist() == expected.tolist()
        assert not bool((removed & ~valid).any())
        if kind == "l":  # exactly the lowest-scored real instances
            for b, k in enumerate(lengths):
                order = scores[b, :k].argsort()
                rescued = int(expected[b]) < math.ceil(ratio * k)  # lowest one kept back
                chosen = order[1:k] if rescued else order[: int(expected[b])]
                assert set(chosen.tolist()) == set(removed[b].nonzero().flatten().tolist())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 200), beta=st.floats(0.005, 0.3), rho=st.sampled_from([0.25, 0.5, 1.0]))
def test_high_attention_mask_counts(n, beta, rho):
    scores = torch.randperm(n).float()[None]  # distinct scores
    valid = torch.ones(1, n, dtype=torch.bool)
    removed = mhim_mask(scores, valid, ratio_h=beta, ratio_hr=rho)
    top_ratio, keep_ratio = (beta / rho, rho) if beta / rho <= 1 else (1.0, beta)
    top_k = math.ceil(n * top_ratio)
    expected = min(math.ceil(keep_ratio * top_k), n - 1)
    assert int(removed.sum()) == expected
    top = set(scores[0].argsort(descending=True)[:top_k].tolist())
    assert set(removed[0].nonzero().flatten().tolist()) <= top


def test_union_of_masks_and_official_c16_counts():
    # N = 1000, ABMIL C16: β_r 0.5 (500 random), β_h 0.01/ρ 0.5 -> top 20, 10 of them.
    torch.manual_seed(0)
    scores = torch.rand(1, 1000)
    valid = torch.ones(1, 1000, dtype=torch.bool)
    high = mhim_mask(scores, valid, ratio_h=0.01, ratio_hr=0.5)
    assert int(high.sum()) == 10
    both = mhim_mask(scores, valid, ratio_h=0.01, ratio_hr=0.5, ratio_r=0.5)
    assert 500 <= int(both.sum()) <= 510
    for ratio in (0.03, 0.07, 0.1, 0.2, 0.7):  # same float64 rounding as np.ceil(N * ratio)
        for n in (40, 100, 333):
            assert int(ceil_count(ratio, torch.tensor([n]))[0]) == math.ceil(n * ratio)


def test_vote_fusion_counts_heads():
    # 3 heads; instance 4 is top in all heads, instance 1 in two, instance 0 in one.
    scores = torch.tensor(
        [[[0.5, 0.9, 0.0, 0.0, 1.0], [0.0, 0.8, 0.1, 0.0, 1.0], [0.0, 0.0, 0.9, 0.0, 1.0]]]
    )
    valid = torch.ones(1, 5, dtype=torch.bool)
    chosen = vote_topk(scores, torch.tensor([2]), valid)
    assert chosen[0].nonzero().flatten().tolist() == [1, 4]


def test_cosine_schedule_endpoints():
    assert cosine_value(0.01, 0.0, 0, 100) == pytest.approx(0.01)
    assert cosine_value(0.01, 0.0, 100, 100) == pytest.approx(0.0)
    assert cosine_value(0.01, 0.0, 50, 100) == pytest.approx(0.005)
    model = models.create("mhim-transmil", 16, 2, mm=0.99, **SMALL_T)
    assert model.momentum_at(0, 10) == pytest.approx(0.99)
    assert model.momentum_at(10, 10) == pytest.approx(1.0)
    assert model.mask_ratio_h_at(10, 10) == 0.0
    plain = models.create("mhim-abmil", 16, 2, mrh_sche=False, mm_sche=False)
    assert plain.mask_ratio_h_at(10, 10) == 0.01 and plain.momentum_at(5, 10) == 0.9999


def test_ema_update_equals_formula():
    torch.manual_seed(0)
    model = models.create("mhim-abmil", 16, 2, mm=0.9, mm_sche=False)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in model.teacher.parameters()]
    student = [p.clone() for p in model.student.parameters()]
    model.on_train_step_end(1, 100)
    for t0, s, t1 in zip(before_t, student, model.teacher.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
    assert float(model.current_mask_ratio_h) == pytest.approx(cosine_value(0.01, 0, 1, 100))
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_training_forward_masks_and_consistency_loss():
    torch.manual_seed(1)
    # Deterministic configuration: no dropout, low mask + high mask with ρ = 1.
    model = models.create(
        "mhim-abmil",
        16,
        3,
        dropout=0.0,
        mask_ratio=0.0,
        mask_ratio_l=0.2,
        mask_ratio_h=0.1,
        mask_ratio_hr=1.0,
        cl_alpha=0.5,
        da_act="tanh",  # tanh: no tied scores
    ).train()
    x = torch.randn(1, 40, 16)
    out = model(x)
    teacher = model.teacher(x)
    order = teacher.attention[0].argsort()
    removed = set(order[:8].tolist()) | set(order[-4:].tolist())
    kept = torch.tensor([i for i in range(40) if i not in removed])
    assert out.attention.shape == (1, 40)
    assert set(out.attention[0].nonzero().flatten().tolist()) == set(kept.tolist())
    ref = model.student.eval()(x[:, kept])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    p_t = torch.softmax(teacher.embedding / 0.1, -1)
    expected = -(p_t * torch.log_softmax(ref.embedding, -1)).sum() * 0.5
    torch.testing.assert_close(out.aux_losses["mhim_cl"], expected, atol=1e-5, rtol=1e-5)


def test_eval_is_student_on_all_instances():
    model = models.create("mhim-transmil", 16, 2, **SMALL_T).eval()
    x = torch.randn(1, 12, 16)
    torch.testing.assert_close(model(x).logits, model.student(x).logits)


def test_padded_training_never_keeps_padding():
    model = models.create("mhim-abmil", 16, 2).train()
    x = torch.randn(2, 30, 16)
    mask = _valid([30, 11], 30)
    out = model(x, mask)
    assert bool((out.attention[1, 11:] == 0).all())
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", ["mhim-abmil", "mhim-transmil"])
def test_v2_grn_and_class_aware_scores(name):
    torch.manual_seed(0)
    kw = SMALL_T if name == "mhim-transmil" else {}
    model = models.create(name, 16, 3, version="v2", mask_ratio_h=0.1, merge_ratio=0.5, **kw)
    model.train()
    x = torch.randn(1, 25, 16)
    h = model.teacher.embed_instances(x)
    out_t = model._teacher_forward(h, None)
    scores = model._class_aware(h, out_t, None)
    assert scores.shape == (1, 25)
    assert bool((scores >= 1 / 3 - 1e-6).all() & (scores <= 1 + 1e-6).all())
    q0 = model.grn.queries.clone()
    out = model(x)
    assert not torch.equal(q0, model.grn.queries)  # EMA step of the global queries
    # Student saw ⌊0.5 · 22⌋ = 11 real instances (25 − ⌈0.1·25⌉ = 22 left) + 1 global token.
    att = out.attention[0].reshape(-1, 25)  # (heads, N); one row for ABMIL
    assert (att > 0).sum(-1).tolist() == [11] * att.shape[0]
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))
    (out.logits.sum() + out.aux_losses["mhim_cl"]).backward()
    assert model.grn.to_q.weight.grad is not None and model.grn.queries.grad is None


def test_teacher_init_from_checkpoint(tmp_path):
    base = models.create("abmil-dattention", 16, 2)
    path = tmp_path / "best.pt"
    torch.save(base.state_dict(), path)
    model = models.create("mhim-abmil", 16, 2, teacher_init=str(path))
    for (name, p), q in zip(model.teacher.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    torch.testing.assert_close(model.student.fc[0].weight, base.fc[0].weight)
    assert not torch.equal(model.student.head.weight, base.head.weight)  # only fc copied
    wrong = tmp_path / "wrong.pt"
    torch.save(models.create("abmil", 16, 2).state_dict(), wrong)
    with pytest.raises(MilkitError, match="does not match the abmil-dattention base"):
        models.create("mhim-abmil", 16, 2, teacher_init=str(wrong))


def test_teacher_init_refuses_a_checkpoint_of_another_model(tmp_path):
    """A plain `transmil` (szc layout) checkpoint has the same keys as MHIM's SAttention base but
    computes another function: refused by its recorded model name, not loaded silently."""
    from milkit.io.checkpoint import save_checkpoint

    meta = {"model_name": "transmil", "in_dim": 16, "class_names": ["a", "b"]}
    path = save_checkpoint(tmp_path / "best.pt", models.create("transmil", 16, 2), meta)
    with pytest.raises(MilkitError, match=r"trained as 'transmil'.*transmil-sattention"):
        models.create("mhim-transmil", 16, 2, teacher_init=str(path))
    meta["model_name"] = "transmil-sattention"
    ok = save_checkpoint(tmp_path / "ok.pt", models.create("transmil-sattention", 16, 2), meta)
    models.create("mhim-transmil", 16, 2, teacher_init=str(ok))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="version"):
        models.create("mhim-abmil", 16, 2, version="v3")
    with pytest.raises(ValueError, match="mask_ratio_hr"):
        models.create("mhim-abmil", 16, 2, mask_ratio_hr=0.0)
    with pytest.raises(ValueError, match="merge_ratio"):
        models.create("mhim-abmil", 16, 2, merge_ratio=1.0)
