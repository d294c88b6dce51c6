"""`.pt` bags: TRIDENT's ``saveas='pt'`` (a pickled numpy array) loads; anything else is refused."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.data.datasets import BagDataset
from milkit.errors import MilkitError
from milkit.io.bags import read_bag, read_bag_header


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_trident_numpy_pt_loads_with_values_and_dtype(tmp_path, dtype):
    # what TRIDENT's WSI.extract_features writes with saveas='pt': torch.save(np.ndarray)
    feats = np.random.default_rng(0).normal(size=(7, 5)).astype(dtype)
    torch.save(feats, tmp_path / "s1.pt")
    bag = read_bag(tmp_path / "s1.pt")
    assert bag.source == "pt" and bag.coords is None
    assert bag.features.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bag.features, feats)
    header = read_bag_header(tmp_path / "s1.pt")
    assert (header.num_instances, header.dim) == (7, 5)
    # and training reads it as float32 features
    features, coords = BagDataset([tmp_path / "s1.pt"], [1]).load(0)
    assert features.dtype == torch.float32 and coords is None
    np.testing.assert_allclose(features.numpy(), feats.astype(np.float32))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(0, 20),
    d=st.integers(1, 9),
    dtype=st.sampled_from(["float32", "float16"]),
    fortran=st.booleans(),
)
def test_numpy_pt_round_trip_any_shape_and_layout(tmp_path_factory, n, d, dtype, fortran):
    feats = np.arange(n * d, dtype=dtype).reshape(n, d)
    if fortran:
        feats = np.asfortranarray(feats)
    path = tmp_path_factory.mktemp("pt") / "b.pt"
    torch.save(feats, path)
    bag = read_bag(path)
    assert bag.features.shape == (n, d) and bag.features.flags.c_contiguous
    np.testing.assert_array_equal(bag.features, feats)


def test_numpy1_module_name_is_accepted(tmp_path):
    # files written under numpy 1.x name the rebuild function numpy.core.multiarray._reconstruct
    feats = np.ones((3, 2), np.float32)
    buf = io.BytesIO()
    # the legacy (non-zip) format is a plain pickle stream, so the name can be rewritten in place;
    # torch.save uses pickle protocol 2, whose GLOBAL opcode holds "module\nname"
    torch.save(feats, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    old = raw.replace(
        b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
    )
    assert old != raw
    (tmp_path / "old.pt").write_bytes(old)
    np.testing.assert_array_equal(read_bag(tmp_path / "old.pt").features, feats)


class _Exploit:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"features": _Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(MilkitError) as info:
        read_bag(tmp_path / "evil.pt")
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert "evil.pt" in message and "system" in message
    assert "refusing to load .pt bag" in message


def test_exploit_fixture_really_executes_without_safety(tmp_path):
    # guards the test above against a fixture that never could run code
    marker = tmp_path / "ran"
    torch.save(_Exploit(str(marker)), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_object_array_and_other_numpy_globals_are_refused(tmp_path):
    torch.save(np.array([["a", "b"]], dtype=object), tmp_path / "obj.pt")
    with pytest.raises(MilkitError, match=r"obj\.pt") as info:
        read_bag(tmp_path / "obj.pt")
    assert "\n" not in str(info.value)
    # a numpy global outside the allow-list (a scalar constructor) stays refused
    torch.save({"x": np.float32(1.0)}, tmp_path / "scalar.pt")
    with pytest.raises(MilkitError, match=r"refusing to load \.pt bag.*scalar\.pt"):
        read_bag(tmp_path / "scalar.pt")


def test_allow_list_does_not_leak_into_other_loads(tmp_path):
    torch.save(np.ones((2, 2), np.float32), tmp_path / "a.pt")
    before = set(torch.serialization.get_safe_globals())  # a set inside torch: order varies
    read_bag(tmp_path / "a.pt")
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "a.pt", weights_only=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (np.ones(4, np.float32), r"\(N, D\) array"),
        (np.ones((2, 2), np.int64), r"floating point"),
        (torch.ones(2, 3, 4), r"\(N, D\) array"),
        ([1.0, 2.0], r"got list"),
    ],
)
def test_wrong_content_one_line_error_naming_file(tmp_path, content, match):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(MilkitError, match=match) as info:
        read_bag(tmp_path / "w.pt")
    assert "w.pt" in str(info.value) and "\n" not in str(info.value)


def test_trident_empty_slide_pt_is_said_to_be_empty(tmp_path):
    # WSI.extract_features saves np.empty((0,)) when the encoder does not state its dimension
    torch.save(np.empty((0,), dtype=np.float32), tmp_path / "blank.pt")
    with pytest.raises(MilkitError, match=r"empty \(no tiles\).*blank\.pt"):
        read_bag(tmp_path / "blank.pt")
    torch.save(np.empty((0, 16), dtype=np.float32), tmp_path / "blank2.pt")
    assert read_bag(tmp_path / "blank2.pt").features.shape == (0, 16)


def test_truncated_pt_is_one_line_error(tmp_path):
    torch.save(np.ones((50, 8), np.float32), tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MilkitError, match=r"cannot load \.pt bag.*t\.pt") as info:
        read_bag(tmp_path / "t.pt")
    assert "\n" not in str(info.value)


def test_checkpoint_refusal_is_one_line_and_names_the_global(tmp_path):
    # the same fault in checkpoints: torch's refusal used to be quoted, newlines and all
    from milkit.training.inference import load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Exploit(str(marker))}, tmp_path / "best.pt")
    with pytest.raises(MilkitError) as info:
        load_checkpoint(tmp_path / "best.pt")
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and "\x1b" not in message and "best.pt" in message
    assert "system" in message and "refusing to load checkpoint" in message
    assert "Weights only load failed" not in message  # torch's prose is not repeated


def test_one_line_helpers():
    from milkit.errors import one_line, refused_global

    text = "a\x1b[1mbold\x1b[0m\n\tb  c"
    assert one_line(text) == "abold b c"
    assert one_line("x" * 50, limit=10) == "x" * 9 + "…"
    err = pickle.UnpicklingError(
        "...\n\tWeightsUnpickler error: Unsupported global: GLOBAL foo.bar was not"
    )
    assert refused_global(err) == "foo.bar"
    assert refused_global(ValueError("nothing")) is None
