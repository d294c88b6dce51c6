"""Registry behaviour: close-match errors, rejected overrides, presets."""

from __future__ import annotations

import pytest
from torch import nn

from milkit.errors import MilkitError, UnknownNameError
from milkit.models.registry import _REGISTRY, create, get_entry, list_models, register_aggregator


class _Toy(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, *, hidden: int = 4, gated: bool = False):
        super().__init__()
        self.hidden, self.gated = hidden, gated


@pytest.fixture
def toy_registered():
    register_aggregator("toy-reg")(_Toy)
    register_aggregator("toy-reg-gated", gated=True)(_Toy)
    yield
    _REGISTRY.pop("toy-reg")
    _REGISTRY.pop("toy-reg-gated")


def test_create_applies_preset_and_overrides(toy_registered):
    model = create("TOY_REG_GATED", 8, 2, hidden=7)
    assert model.gated and model.hidden == 7
    assert {"toy-reg", "toy-reg-gated"} <= set(list_models("toy-*"))


def test_unknown_name_lists_close_matches(toy_registered):
    with pytest.raises(KeyError, match="Did you mean: toy-reg"):
        get_entry("toy-rge")


def test_unknown_name_is_one_milkit_error_line_and_a_key_error(toy_registered):
    # The CLI prints MilkitErrors as they are: no KeyError quotes, the template's layout.
    with pytest.raises(UnknownNameError) as info:
        create("toy-rge", 8, 2)
    err = info.value
    assert isinstance(err, MilkitError) and isinstance(err, KeyError)
    assert str(err).startswith("unknown aggregator, got 'toy-rge'. Did you mean: toy-reg")
    assert str(err).endswith("registered names") and err.value == "toy-rge"


def test_unknown_override_lists_accepted(toy_registered):
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['hiden'\].*'hidden'"):
        create("toy-reg", 8, 2, hiden=3)


def test_single_class_is_rejected(toy_registered):
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create("toy-reg", 8, 1)
