"""Where encoder weights are found: Hugging Face cache, torch hub's checkpoints (torchvision's
ResNet-50 as CLAM loads it), and what the error says when they are not (offline, local files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from milkit.errors import MilkitError
from milkit.feature_extraction.encoders import create_encoder
from milkit.feature_extraction.encoders.registry import load_state_dict

V1 = "resnet50-0676ba61.pth"  # torchvision >= 0.13, IMAGENET1K_V1
CLAM_V1 = "resnet50-19c8e357.pth"  # the URL CLAM's resnet_custom.py loads
V2 = "resnet50-11ad3fa6.pth"  # torchvision IMAGENET1K_V2: not CLAM's weights


@pytest.fixture(scope="module")
def torchvision_sd() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state_dict (random weights, torchvision's own key layout)."""
    import torchvision

    torch.manual_seed(0)
    return {k: v.clone() for k, v in torchvision.models.resnet50().state_dict().items()}


@pytest.fixture()
def caches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(empty Hugging Face hub cache, torch hub checkpoints folder under a fake TORCH_HOME)."""
    import huggingface_hub.constants as hc

    hf = tmp_path / "hf" / "hub"
    hf.mkdir(parents=True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # set_dir() elsewhere would win over env
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    assert Path(torch.hub.get_dir()) / "checkpoints" == ckpt
    return hf, ckpt


def _torchvision_trunc(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CLAM's resnet50_baseline forward on torchvision's module: stem, layer1-3, avg-pool."""
    import torchvision

    m = torchvision.models.resnet50()
    m.load_state_dict(sd)
    m.eval()
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer3(m.layer2(m.layer1(h)))
        return torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)


@pytest.mark.parametrize("name", [V1, CLAM_V1])
def test_resnet50_trunc_uses_torchvisions_file_in_torch_hub(caches, torchvision_sd, name):
    """Before: 'no weights found' although CLAM users have this file."""
    _, ckpt = caches
    sd = dict(torchvision_sd)
    if name == CLAM_V1:  # the 2017 file predates BatchNorm's num_batches_tracked buffer
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, ckpt / name)
    enc, _ = create_encoder("resnet50-trunc", precision="fp32")
    assert enc.weights_path == ckpt / name
    assert enc.features_attrs()["encoder_weights_file"] == name
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc(x), _torchvision_trunc(torchvision_sd, x), rtol=1e-4, atol=1e-4)


def test_hugging_face_cache_is_searched_first(caches, torchvision_sd):
    from safetensors.torch import save_file

    from tests.feature_extraction.test_encoders import _fake_hf_cache_file

    hf, ckpt = caches
    torch.save(torchvision_sd, ckpt / V1)
    target = _fake_hf_cache_file(hf, "timm/resnet50.tv_in1k", "model.safetensors")
    save_file(torchvision_sd, str(target))
    enc, _ = create_encoder("resnet50-trunc")
    assert enc.weights_path == target


def test_missing_weights_lists_every_place_and_passes_over_v2(caches, torchvision_sd):
    hf, ckpt = caches
    (ckpt / V2).write_bytes(b"")  # torchvision's V2 weights: other features than CLAM's
    with pytest.raises(MilkitError) as err:
        create_encoder("resnet50-trunc")
    msg = str(err.value)
    assert f"the Hugging Face cache {hf} for timm/resnet50.tv_in1k/model.safetensors" in msg
    assert f"torch hub's checkpoints {ckpt} for {V1}, {CLAM_V1}" in msg
    assert f"{ckpt / V2} found but not used (torchvision's IMAGENET1K_V2 weights" in msg
    assert "IMAGENET1K_V1" in msg and "--weights FILE" in msg  # how to get them


def test_without_huggingface_hub_the_error_says_the_cache_was_not_searched(caches, monkeypatch):
    """Before: the lookup was skipped silently while the error claimed the cache was searched."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(MilkitError) as err:
        create_encoder("uni")
    msg = str(err.value)
    assert "Hugging Face cache was NOT searched: huggingface_hub is not installed" in msg
    assert "MahmoodLab/UNI" in msg  # the download hint is still there


def test_huggingface_hub_is_a_base_dependency():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert any(d.replace("-", "_").startswith("huggingface_hub") for d in project["dependencies"])


def test_pickled_objects_are_refused_in_one_line_naming_the_global(tmp_path, torchvision_sd):
    """Before: torch's 15-line weights_only refusal (with ANSI colours) was quoted whole."""
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": torchvision_sd, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(MilkitError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert "\n" not in msg and "\x1b[" not in msg and len(msg) < 400
    assert "refusing to load weights file" in msg and "(argparse.Namespace)" in msg
    assert str(path) in msg and "state_dict" in msg
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])  # truncated download
    with pytest.raises(MilkitError, match="cannot read weights file") as err:
        load_state_dict(tmp_path / "cut.pth")
    assert "\n" not in str(err.value)
