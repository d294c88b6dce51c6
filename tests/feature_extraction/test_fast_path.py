"""CPU fast paths (the default oneDNN fusion; opt-in ONNX Runtime, OpenVINO, bf16,
torch.compile) against the fp32 reference.

Every fast path must give features within cosine ≥ 0.999 per tile of the torch fp32 encoder on
real tissue tiles (CMU-1-Small-Region), and the bag must record the runtime so that resume never
mixes runtimes. A random-weight ResNet-50 is used: speed and agreement do not depend on the
weights (its BatchNorm statistics are randomised so that folding them is exercised).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from milkit.errors import MilkitError
from milkit.feature_extraction.encoders import create_encoder
from milkit.feature_extraction.encoders.onednn import OneDNNConv, fuse_for_onednn
from milkit.feature_extraction.encoders.registry import cpu_has_native_bf16
from milkit.feature_extraction.encoders.resnet import build_resnet50_backbone
from milkit.feature_extraction.extract import ExtractConfig, preprocess
from milkit.feature_extraction.recipe import build_recipe, recipe_differences

COSINE_FAST = 0.999  # the bound for every fast path
COSINE_FP32 = 0.99999  # fp32 in another runtime: only summation order differs
SLIDE = "CMU-1-Small-Region.svs"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone = build_resnet50_backbone()
    gen = torch.Generator().manual_seed(1)
    for mod in backbone.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2, generator=gen)
            mod.running_var.uniform_(0.5, 2.0, generator=gen)
            mod.weight.data.uniform_(0.5, 1.5, generator=gen)
    path = tmp_path_factory.mktemp("w") / "resnet50_random.pth"
    torch.save(backbone.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiles(slides_dir) -> torch.Tensor:
    """16 tissue tiles (256 px at 0.5 µm/px) of the real H&E slide, uint8 (16, 256, 256, 3)."""
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.tiling import TileSpec, plan_tiles, read_tile
    from milkit.feature_extraction.tissue import segment_tissue

    with Slide(slides_dir / SLIDE) as slide:
        grid = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
        assert len(grid) >= 16
        pick = np.linspace(0, len(grid) - 1, 16).astype(int)
        return torch.from_numpy(np.stack([read_tile(slide, grid, int(i)) for i in pick]))


@pytest.fixture(scope="module")
def reference(weights, tiles) -> torch.Tensor:
    """fp32 features of the module as loaded (eager, BatchNorm not folded): CLAM's network."""
    enc, _ = create_encoder("resnet50-trunc", weights=weights, precision="fp32", compile="off")
    assert (enc.runtime, enc.precision, enc.compiled) == ("torch", "fp32", False)
    with torch.inference_mode():
        return enc.model(enc.preprocess(tiles)).float()


def test_default_cpu_encoder_folds_batchnorm_with_the_same_features(weights, tiles, reference):
    enc, _ = create_encoder("resnet50-trunc", weights=weights, compile="off")
    assert enc.precision == "fp32"  # declared fp32 stays fp32 ("as CLAM")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.runner.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())  # as loaded
    cos = _cosines(enc.encode(tiles), reference)
    assert cos.min() >= COSINE_FP32, f"worst tile cosine {cos.min():.8f}"


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


FAST_PATHS = [
    ("onnxruntime", "fp32", COSINE_FP32),
    ("onnxruntime", "int8", COSINE_FAST),  # calibrated on synthetic tiles, tested on real ones
    ("openvino", "fp32", COSINE_FP32),
    ("openvino", "bf16", COSINE_FAST),
    ("torch", "bf16", COSINE_FAST),
]


@pytest.mark.slow
@pytest.mark.parametrize(("runtime", "precision", "bound"), FAST_PATHS)
def test_fast_path_agrees_with_fp32_per_tile(weights, tiles, reference, runtime, precision, bound):
    needs = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}.get(runtime, ())
    if not all(_installed(m) for m in needs):
        pytest.skip(f"{runtime} is not installed (pip install 'milkit[fast-cpu]')")
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    enc, _ = create_encoder(
        "resnet50-trunc", weights=weights, precision=precision, runtime=runtime, compile="off"
    )
    feats = enc.encode(tiles)
    assert feats.shape == (16, 1024) and feats.dtype == torch.float32
    cos = _cosines(feats, reference)
    assert cos.min() >= bound, f"{runtime}/{precision}: worst tile cosine {cos.min():.7f}"
    # A short batch (not the size seen first) gives the same rows.
    assert torch.allclose(enc.encode(tiles[3:6]), feats[3:6], rtol=1e-3, atol=1e-4)
    attrs = enc.features_attrs()
    assert (attrs["encoder_runtime"], attrs["encoder_precision"]) == (runtime, precision)


@pytest.mark.slow
def test_compiled_torch_encoder_agrees_and_pads_short_batches(weights, tiles, reference):
    enc, _ = create_encoder("resnet50-trunc", weights=weights, precision="fp32", compile="on")
    enc.prepare(n_tiles=len(tiles), batch_size=8)
    if not enc.compiled:
        pytest.skip("torch.compile is unavailable here (no C++ compiler)")
    # a full batch, a padded short one (5 of 8) and a few tiles run eagerly (3 of 8)
    feats = torch.cat([enc.encode(tiles[:8]), enc.encode(tiles[8:13]), enc.encode(tiles[13:])])
    assert _cosines(feats, reference).min() >= COSINE_FP32
    assert enc.features_attrs()["encoder_compiled"] is True
    assert enc.encode(tiles).shape == (16, 1024)  # a batch above the compiled size: eager


def test_default_short_run_uses_the_onednn_fused_graph_with_the_same_features(
    weights, tiles, reference
):
    enc, _ = create_encoder("resnet50-trunc", weights=weights)  # compile="auto", the default
    enc.prepare(n_tiles=len(tiles), batch_size=8)  # a run far below COMPILE_MIN_TILES
    first = enc.encode(tiles[:8])  # fused on the first batch, checked on its first tile
    assert (enc.execution, enc.fused, enc.compiled) == ("onednn-fused", True, False)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in enc.runner.modules())
    assert sum(isinstance(m, OneDNNConv) for m in enc.runner.modules()) == 43  # every conv
    assert enc.features_attrs()["encoder_execution"] == "onednn-fused"
    feats = torch.cat([first, enc.encode(tiles[8:13]), enc.encode(tiles[13:])])
    cos = _cosines(feats, reference)
    assert cos.min() >= COSINE_FP32, f"worst tile cosine {cos.min():.8f}"
    enc.prepare(n_tiles=10**5, batch_size=8)
    assert enc.execution == "onednn-fused"  # a long run: compiling would not be faster
    off, _ = create_encoder("resnet50-trunc", weights=weights, compile="off")
    off.prepare(n_tiles=len(tiles), batch_size=8)
    assert off.execution == "eager" and off.features_attrs()["encoder_execution"] == "eager"


def test_failed_fusion_warns_and_runs_eagerly(weights, tiles, reference, monkeypatch):
    import milkit.feature_extraction.encoders.onednn as onednn

    def broken(*args, **kwargs):
        raise RuntimeError("operator mkldnn::_convolution_pointwise missing")

    monkeypatch.setattr(onednn, "fuse_for_onednn", broken)
    enc, _ = create_encoder("resnet50-trunc", weights=weights)
    enc.prepare(n_tiles=len(tiles), batch_size=8)
    with pytest.warns(RuntimeWarning, match=r"oneDNN fusion of encoder 'resnet50-trunc' failed"):
        feats = enc.encode(tiles)
    assert _cosines(feats, reference).min() >= COSINE_FP32  # that batch too
    assert enc.execution == "eager" and enc.features_attrs()["encoder_execution"] == "eager"
    assert _cosines(enc.encode(tiles), reference).min() >= COSINE_FP32
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    enc.prepare(n_tiles=2000, batch_size=8)  # a long run may still be compiled
    assert enc.execution == "torch.compile"


def test_fusion_that_changes_features_is_refused(weights, tiles, reference, monkeypatch):
    """The check inside the fusion catches oneDNN operators that compute something else (a
    future PyTorch): the run warns and stays eager instead of writing other features."""
    real_forward = OneDNNConv.forward

    def wrong(self, x, other=None):  # e.g. a post-op that is no longer applied
        out = real_forward(self, x, other)
        return out if self.unary == "none" else out - 0.5

    monkeypatch.setattr(OneDNNConv, "forward", wrong)
    enc, _ = create_encoder("resnet50-trunc", weights=weights)
    with pytest.raises(RuntimeError, match="differs from the eager one"):
        fuse_for_onednn(enc.runner, 224, 8, reference=enc.model)
    enc.prepare(n_tiles=len(tiles), batch_size=8)
    with pytest.warns(RuntimeWarning, match="differs from the eager one"):
        feats = enc.encode(tiles)
    assert enc.execution == "eager"
    assert _cosines(feats, reference).min() >= COSINE_FP32
    assert _cosines(enc.encode(tiles), reference).min() >= COSINE_FP32


class _Residuals(torch.nn.Module):
    """Patterns the fusion must keep right: a shortcut read again after the add, a conv whose
    input is its own shortcut, one conv called twice (with and without ReLU), a conv output
    read by two nodes, a functional ReLU, groups, stride, no bias."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.c3 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c4 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.c0(x))
        z = self.act(self.c1(y) + y)  # shortcut y is read again below: not in place
        z = z + y
        w = self.c2(z) + self.act(self.c2(z))  # shortcut: the fused ReLU conv, dead: in place
        w = torch.relu(self.c3(w) + w)  # the conv's input is its shortcut: not in place
        v = self.act(self.c3(w) + w) * w  # the shortcut is read after the add: not in place
        u = self.c4(v)
        return (u + self.c4(v)).mean((2, 3))  # dead shortcut from a fused conv: in place


def test_fused_residual_patterns_match_eager():
    model = _Residuals().eval()
    fused = fuse_for_onednn(model, input_size=16, batch_size=4)
    convs = [m for m in fused.modules() if isinstance(m, OneDNNConv)]
    assert len(convs) == 8  # one fused module per call
    assert sum(m.inplace for m in convs) == 2  # only the two dead shortcuts above
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = model(x.clone()), fused(x.clone())
        again = fused(x.clone())
        short = fused(x[:3].clone())  # a batch other than the one the weights were laid out for
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, again)
    assert torch.allclose(short, want[:3], rtol=1e-4, atol=1e-5)


def test_fusion_writes_in_place_only_into_a_dead_shortcut(weights):
    enc, _ = create_encoder("resnet50-trunc", weights=weights, compile="off")
    fused = fuse_for_onednn(enc.runner, 224, 4)
    inplace = [n for n, m in fused.named_modules() if isinstance(m, OneDNNConv) and m.inplace]
    # the 13 bottlenecks of layer1-3: conv3 + shortcut (+ ReLU), shortcut dead afterwards
    assert len(inplace) == 13 and all(n.endswith("conv3_onednn") for n in inplace)


def test_compile_auto_waits_for_a_long_run(weights, monkeypatch):
    compiled_models = []

    def fake_compile(model, **kwargs):  # the decision is tested here, not inductor
        compiled_models.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    enc, _ = create_encoder("resnet50-trunc", weights=weights, compile="auto")
    enc.cfg = dataclasses.replace(enc.cfg, cpu_fuse=False)  # an encoder without the fusion
    enc.prepare(n_tiles=100, batch_size=2)
    assert not enc.compiled  # 11-35 s of compiling would not pay off on 100 tiles
    enc.prepare(n_tiles=1850, batch_size=2)
    assert not enc.compiled
    enc.prepare(n_tiles=50, batch_size=2)  # the run's slides now add up to 2,000 tiles
    assert enc.compiled and len(compiled_models) == 1
    enc.prepare(n_tiles=5000, batch_size=2)
    assert len(compiled_models) == 1  # once per run
    off, _ = create_encoder("resnet50-trunc", weights=weights, compile="off")
    off.prepare(n_tiles=10**6, batch_size=2)
    assert not off.compiled
    fast, _ = create_encoder("fast", compile="auto")
    fast.prepare(n_tiles=10**6, batch_size=64)
    assert not fast.compiled  # weight-free encoder: already thousands of tiles/s


def test_runtime_errors_name_the_problem(weights, monkeypatch):
    with pytest.raises(MilkitError, match="unknown runtime"):
        create_encoder("resnet50-trunc", weights=weights, runtime="tensorrt")
    with pytest.raises(MilkitError, match="runs on CPU only"):
        create_encoder("resnet50-trunc", weights=weights, runtime="openvino", device="cuda")
    with pytest.raises(MilkitError, match="'onnxruntime' runs fp32, int8 only"):
        create_encoder("resnet50-trunc", weights=weights, runtime="onnxruntime", precision="bf16")
    with pytest.raises(MilkitError, match=r"int8 runs with --runtime onnxruntime only"):
        create_encoder("resnet50-trunc", weights=weights, precision="int8")
    with pytest.raises(MilkitError, match=r"'openvino' runs fp32, bf16 only"):
        create_encoder("resnet50-trunc", weights=weights, runtime="openvino", precision="int8")
    import builtins

    real_import = builtins.__import__

    def without_openvino_and_onnx(name, *args, **kwargs):
        if name in ("openvino", "onnx"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_openvino_and_onnx)
    with pytest.raises(MilkitError, match=r"not installed.*pip install openvino"):
        create_encoder("resnet50-trunc", weights=weights, runtime="openvino")
    if _installed("onnxruntime"):  # torch.onnx.export needs onnx: said before any work
        with pytest.raises(MilkitError, match=r"no module 'onnx'.*pip install onnxruntime onnx"):
            create_encoder("resnet50-trunc", weights=weights, runtime="onnxruntime")


def test_recipe_records_the_runtime():
    torch_recipe = build_recipe(
        ExtractConfig(), weights_sha256="ab", precision="fp32", slide_mpp=None
    )
    ov_recipe = build_recipe(
        ExtractConfig(runtime="openvino"), weights_sha256="ab", precision="fp32", slide_mpp=None
    )
    assert recipe_differences(torch_recipe, ov_recipe) == [("runtime", "torch", "openvino")]
    # compile changes no feature beyond 1e-5 cosine: not part of the recipe
    compiled = build_recipe(
        ExtractConfig(compile="on"), weights_sha256="ab", precision="fp32", slide_mpp=None
    )
    assert recipe_differences(torch_recipe, compiled) == []


@pytest.mark.slow
@pytest.mark.skipif(not _installed("openvino"), reason="openvino is not installed")
def test_bag_records_runtime_and_resume_refuses_another(slides_dir, weights, tmp_path):
    slide = slides_dir / SLIDE
    common = dict(
        encoder="resnet50-trunc", weights=weights, mpp=2.0, num_workers=0, progress=False, qc=False
    )
    out = tmp_path / "bags"
    first = preprocess([slide], out, ExtractConfig(runtime="openvino", **common))
    assert first.exit_code == 0, first.format()
    with h5py.File(out / "CMU-1-Small-Region.h5", "r") as f:
        attrs = dict(f["features"].attrs)
        recipe = json.loads(f.attrs["recipe"])
    assert attrs["encoder_runtime"] == "openvino" and attrs["encoder_precision"] == "fp32"
    assert recipe["runtime"] == "openvino"
    again = preprocess([slide], out, ExtractConfig(runtime="openvino", **common))
    assert again.count("skipped") == 1
    other = preprocess([slide], out, ExtractConfig(runtime="torch", **common))
    assert other.exit_code == 1
    assert "runtime 'openvino' → 'torch' (--runtime)" in other.failed[0].error
