"""Patch encoders: registry, offline weight loading (real code paths), transforms, fast encoder."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milkit.errors import MilkitError
from milkit.feature_extraction.encoders import create_encoder, get_encoder_cfg, list_encoders
from milkit.feature_extraction.encoders import vit as vit_mod
from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def _fake_hf_cache_file(cache: Path, repo_id: str, filename: str) -> Path:
    """Lay out a file the way huggingface_hub caches it (refs/main → snapshots/<hash>/file)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap / filename


def test_registry_lists_required_encoders():
    names = list_encoders()
    for required in ("fast", "resnet50-trunc", "uni", "virchow2"):
        assert required in names
    assert list_encoders("uni*") == ["uni", "uni2-h"]
    dims = {n: get_encoder_cfg(n).embed_dim for n in names}
    assert dims["resnet50-trunc"] == 1024
    assert dims["uni"] == 1024
    assert dims["virchow2"] == 2560


def test_unknown_encoder_suggests_close_match():
    with pytest.raises(MilkitError, match=r"unknown encoder.*resnet50-trunc"):
        create_encoder("resnet50")


def test_missing_weights_error_names_hub_file(empty_hf_cache):
    with pytest.raises(MilkitError) as err:
        create_encoder("uni")
    msg = str(err.value)
    assert "MahmoodLab/UNI" in msg and "pytorch_model.bin" in msg and "--weights" in msg


def test_weights_path_not_found(tmp_path):
    with pytest.raises(MilkitError, match=r"weights file .* not found"):
        create_encoder("resnet50-trunc", weights=tmp_path / "nope.pth")


def test_fast_encoder_rejects_weights(tmp_path):
    with pytest.raises(MilkitError, match="has no weights"):
        create_encoder("fast", weights=tmp_path / "w.pth")


def _reference_resnet_trunc(state_dict: dict, x: torch.Tensor) -> torch.Tensor:
    """CLAM/TRIDENT construction: timm features_only out_indices=(3,) + adaptive avg-pool."""
    import timm

    ref = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
    ref.load_state_dict(state_dict, strict=False)
    ref.eval()
    with torch.no_grad():
        return torch.nn.functional.adaptive_avg_pool2d(ref(x)[0], 1).flatten(1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_resnet50_trunc_loads_local_checkpoint(tmp_path, fmt):
    torch.manual_seed(0)
    backbone = build_resnet50_backbone()
    sd = {k: v.clone() for k, v in backbone.state_dict().items()}
    path = tmp_path / f"resnet50.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)  # wrapped, as training scripts save them
    enc, cfg = create_encoder("resnet50-trunc", weights=path, precision="fp32")
    assert cfg.embed_dim == 1024 and enc.weights_path == path
    torch.testing.assert_close(enc.model.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])
    attrs = enc.features_attrs()
    assert attrs["encoder"] == "resnet50-trunc" and len(attrs["encoder_weights_sha256"]) == 64
    if fmt == "pth":
        return
    x = torch.randn(1, 3, 96, 96)  # the trunk is size-agnostic: a small input keeps this fast
    feats = enc(x)
    assert feats.shape == (1, 1024) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _reference_resnet_trunc(sd, x), rtol=1e-4, atol=1e-4)
    # bf16 autocast (the CPU default where bf16 is native) stays close to fp32.
    enc.precision = "bf16"
    rel = (enc(x) - feats).norm() / feats.norm()
    assert rel < 0.05


def test_resnet50_trunc_from_hf_cache_and_rejects_foreign_keys(empty_hf_cache, tmp_path):
    from safetensors.torch import save_file

    backbone = build_resnet50_backbone()
    sd = {k: v for k, v in backbone.state_dict().items() if not k.startswith(("layer4", "fc"))}
    target = _fake_hf_cache_file(empty_hf_cache, "timm/resnet50.tv_in1k", "model.safetensors")
    save_file(sd, str(target))
    enc, _ = create_encoder("resnet50-trunc")  # truncated checkpoint, found in the cache
    assert enc.weights_path == target
    bad = dict(sd)
    bad["head.weight"] = torch.zeros(3)
    del bad["conv1.weight"]
    bad_path = tmp_path / "bad.pth"
    torch.save(bad, bad_path)
    with pytest.raises(MilkitError, match=r"weights do not match.*missing 1.*conv1.weight"):
        create_encoder("resnet50-trunc", weights=bad_path)


# Published parameter counts (model cards / papers): the timm kwargs must rebuild them.
_PARAMS = {
    "uni": 303e6,  # ViT-L/16: 303M
    "virchow2": 631e6,  # ViT-H/14 with SwiGLU: 632M
    "uni2-h": 681e6,  # UNI2-h: 681M
    "h-optimus-0": 1.13e9,  # ViT-g/14: 1.1B
}


@pytest.mark.parametrize("name", sorted(_PARAMS))
def test_vit_full_config_matches_published_architecture(name):
    with torch.device("meta"):
        vit = vit_mod.build_timm_vit(name)
    n = sum(p.numel() for p in vit.parameters())
    assert abs(n - _PARAMS[name]) / _PARAMS[name] < 0.02, n
    embed = vit.embed_dim
    out_dim = get_encoder_cfg(name).embed_dim
    assert out_dim == (2 * embed if name == "virchow2" else embed)
    assert getattr(vit, "num_reg_tokens", 0) == {"virchow2": 4, "uni2-h": 8, "h-optimus-0": 4}.get(
        name, 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uni", "virchow2"])
def test_vit_strict_load_roundtrip_and_pooling(tmp_path, monkeypatch, name):
    """Full width, one block: the real loading code maps every key and pools as documented."""
    monkeypatch.setattr(
        vit_mod, "build_timm_vit", functools.partial(vit_mod.build_timm_vit, depth=1)
    )
    torch.manual_seed(1)
    src = vit_mod.build_timm_vit(name).eval()
    path = tmp_path / f"{name}.bin"
    torch.save(src.state_dict(), path)
    enc, cfg = create_encoder(name, weights=path, precision="fp32")
    tiles = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    feats = enc.encode(tiles)
    assert feats.shape == (1, cfg.embed_dim)
    with torch.no_grad():
        tokens = src.forward_features(enc.preprocess(tiles).contiguous())
        if name == "virchow2":
            expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        else:
            expected = tokens[:, 0]
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
    # A checkpoint of another architecture is refused with a clear message.
    other = "virchow2" if name == "uni" else "uni"
    wrong = tmp_path / "wrong.bin"
    torch.save(vit_mod.build_timm_vit(other).state_dict(), wrong)
    with pytest.raises(MilkitError, match=f"weights do not match encoder '{name}'"):
        create_encoder(name, weights=wrong)


def test_preprocess_normalises_and_resizes():
    enc, cfg = create_encoder("fast")
    tiles = torch.full((3, 100, 100, 3), 200, dtype=torch.uint8)
    x = enc.preprocess(tiles)
    assert x.shape == (3, 3, cfg.input_size, cfg.input_size)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, torch.full_like(x, 200 / 255))


def _he_like_patch(rng: np.random.Generator, dense: bool) -> np.ndarray:
    """Pink stroma with purple nuclei; 'tumour' = many large dark nuclei, 'normal' = few small."""
    import cv2

    size = 96
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([235, 170, 200]) + rng.normal(0, 6, 3)
    n, radius = (40, (3, 6)) if dense else (8, (1, 3))
    for _ in range(n):
        cy, cx = (int(v) for v in rng.integers(0, size, 2))
        colour = [float(c) for c in np.array([90, 50, 140]) + rng.normal(0, 10, 3)]
        cv2.circle(img, (cx, cy), int(rng.integers(*radius)), colour, -1)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_fast_encoder_separates_tumour_from_normal():
    rng = np.random.default_rng(0)
    labels = np.array([i % 2 for i in range(160)])
    tiles = np.stack([_he_like_patch(rng, bool(y)) for y in labels])
    enc, cfg = create_encoder("fast")
    feats = enc.encode(torch.from_numpy(tiles)).numpy().astype(np.float64)
    assert feats.shape == (160, cfg.embed_dim)
    # Ridge-regression classifier on standardised features, fit on 100, scored on 60.
    mu, sd = feats[:100].mean(0), feats[:100].std(0) + 1e-8
    z = (feats - mu) / sd
    a = np.c_[z, np.ones(len(z))]
    w = np.linalg.solve(
        a[:100].T @ a[:100] + 1.0 * np.eye(a.shape[1]), a[:100].T @ (2.0 * labels[:100] - 1)
    )
    acc = ((a[100:] @ w > 0) == labels[100:]).mean()
    assert acc >= 0.95


def test_fast_encoder_deterministic_and_batch_invariant():
    rng = np.random.default_rng(3)
    tiles = torch.from_numpy(rng.integers(0, 256, (12, 96, 96, 3), dtype=np.uint8))
    a, _ = create_encoder("fast")
    b, _ = create_encoder("fast")
    full = a.encode(tiles)
    assert torch.equal(full, b.encode(tiles))
    assert torch.equal(full[5:9], a.encode(tiles[5:9]))
    # Colour matters: a white tile and a pink tile differ.
    white = torch.full((1, 64, 64, 3), 245, dtype=torch.uint8)
    pink = torch.tensor([230, 150, 190], dtype=torch.uint8).expand(1, 64, 64, 3).contiguous()
    assert not torch.allclose(a.encode(white), a.encode(pink))


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(8, 200),
    w=st.integers(8, 200),
    seed=st.integers(0, 2**16),
    flat=st.booleans(),
)
def test_fast_encoder_finite_for_any_tile(h, w, seed, flat):
    enc, cfg = _fast()
    rng = np.random.default_rng(seed)
    if flat:
        arr = np.full((2, h, w, 3), rng.integers(0, 256), np.uint8)
    else:
        arr = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    out = enc.encode(torch.from_numpy(arr))
    assert out.shape == (2, cfg.embed_dim)
    assert torch.isfinite(out).all()


@functools.lru_cache(maxsize=1)
def _fast():
    return create_encoder("fast")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_keeps_declared_fp32_encoders_fp32(monkeypatch, native_bf16):
    """resnet50-trunc is declared fp32 (CLAM, TRIDENT): auto never autocasts it to bf16."""
    import torch

    from milkit.feature_extraction.encoders import get_encoder_cfg, registry

    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: native_bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resnet, uni = get_encoder_cfg("resnet50-trunc"), get_encoder_cfg("uni")
    assert registry.resolve_precision(resnet, cpu, "auto") == "fp32"
    assert registry.resolve_precision(resnet, cuda, "auto") == "fp32"
    assert registry.resolve_precision(get_encoder_cfg("fast"), cpu, "auto") == "fp32"
    assert registry.resolve_precision(uni, cuda, "auto") == "fp16"
    assert registry.resolve_precision(uni, cpu, "auto") == ("bf16" if native_bf16 else "fp32")
    assert registry.resolve_precision(resnet, cpu, "bf16") == "bf16"  # asked for: honoured
