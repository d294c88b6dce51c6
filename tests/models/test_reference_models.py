"""mi-net and threshold-mil: the contract, padding, and provable monotonicity in the bag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit import models

NAMES = ["mi-net", "threshold-mil"]


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_marked_mil_respecting(name: str) -> None:
    assert name in models.list_models()
    assert models.get_entry(name).cls.mil_respecting is True


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shapes(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    m = models.create(name, 8, num_classes).eval()
    out = m(torch.randn(3, 7, 8))
    assert out.logits.shape == (3, num_classes)
    assert out.instance_logits.shape == (3, 7, num_classes)
    assert out.embedding.shape[0] == 3 and out.embedding.shape[1] == m.embed_dim
    assert out.attention is None


def test_minet_binary_probability_is_max_of_instance_probabilities() -> None:
    torch.manual_seed(0)
    m = models.create("mi-net", 8, 2).eval()
    x = torch.randn(1, 9, 8)
    out = m(x)
    inst_p = torch.sigmoid(out.instance_logits[0, :, 1] - out.instance_logits[0, :, 0])
    bag_p = torch.softmax(out.logits, -1)[0, 1]
    torch.testing.assert_close(bag_p, inst_p.max())


@pytest.mark.parametrize("name", NAMES)
def test_padding_with_garbage_matches_single_bags(name: str) -> None:
    torch.manual_seed(1)
    m = models.create(name, 6, 2).eval()
    a, b = torch.randn(4, 6), torch.randn(9, 6)
    x = torch.full((2, 9, 6), 50.0)  # large padding values must not leak through the max
    x[0, :4], x[1] = a, b
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4], mask[1] = True, True
    batched = m(x, mask=mask)
    torch.testing.assert_close(batched.logits[0], m(a[None]).logits[0])
    torch.testing.assert_close(batched.logits[1], m(b[None]).logits[0])
    assert (batched.instance_logits[0, 4:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_bag_is_rejected(name: str) -> None:
    m = models.create(name, 6, 2)
    with pytest.raises(ValueError, match="fully masked"):
        m(torch.randn(2, 3, 6), mask=torch.tensor([[True, True, False], [False] * 3]))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    name=st.sampled_from(NAMES),
    scale=st.sampled_from([1.0, 5.0, 10.0]),
)
def test_adding_an_instance_never_lowers_the_positive_score(
    seed: int, n: int, name: str, scale: float
) -> None:
    torch.manual_seed(seed)
    m = models.create(name, 5, 2).eval()
    # random (untrained) weights, including negative combination parameters
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0)
    bag = torch.randn(1, n, 5) * scale
    extra = torch.randn(1, 1, 5) * scale
    with torch.no_grad():
        before = m(bag).logits[0]
        after = m(torch.cat([bag, extra], dim=1)).logits[0]
    s_before, s_after = before[1] - before[0], after[1] - after[0]
    assert s_after >= s_before - 1e-5 * (1 + s_before.abs())


def test_threshold_mil_weights_are_non_negative_and_and_like() -> None:
    m = models.create("threshold-mil", 4, 2, num_concepts=2)
    assert (F.softplus(m.raw_weight) > 0).all()
    # noisy-AND: with both concepts present the score beats either concept alone
    z = torch.tensor([[-0.01, -0.01], [-0.01, -6.0], [-6.0, -0.01]])  # log presences
    s = m.combine(z)[:, 0]
    assert s[0] > s[1] + 1 and s[0] > s[2] + 1


def test_threshold_mil_linear_detector_option_and_bad_values() -> None:
    m = models.create("threshold-mil", 4, 3, detector="sigmoid", num_concepts=3)
    assert m(torch.randn(2, 5, 4)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="detector"):
        models.create("threshold-mil", 4, 2, detector="cubic")
    with pytest.raises(ValueError, match="num_concepts"):
        models.create("threshold-mil", 4, 2, num_concepts=0)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_changes_class_count(name: str) -> None:
    m = models.create(name, 4, 2)
    m.reset_classifier(5)
    assert m(torch.randn(1, 3, 4)).logits.shape == (1, 5)
