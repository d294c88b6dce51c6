"""milkit equals the papers' official code: every fixture of ``shared/data/fidelity``.

Each fixture holds one official ``nn.Module``'s state dict under its official key names, input
bags and the official outputs (float64, CPU, eval). The state goes through
``milkit.models.load_official`` (the same path as ``milkit import-weights``) and the milkit model
must reproduce the outputs at the sidecar's tolerance: float64 atol 1e-12 (the AEM term 1e-6),
float32 atol/rtol 1e-5 (1e-4 for the trained MHIM checkpoint). Skipped when the folder is absent.

The cases the fixture README marks "no" at commit ab7cc23 (MHIM selfattn, R²T region 16, SupCon,
TransMIL under nystrom-attention 0.0.9) are asserted both ways: the corrected default equals the
official output, and milkit's old behaviour (still reachable through a named option) does not.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from einops import rearrange

from milkit import models
from tests.conftest import SHARED_DATA

FIXTURES = SHARED_DATA / "fidelity"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fidelity fixtures not present")

F64 = 1e-12  # README "Tolerances": observed <= 2.6e-15
AEM_TERM = 1e-6  # milkit evaluates the AEM term in float32
# MambaMIL: official and milkit both take A = −exp(A_log) in float32, and torch's float32 CPU exp
# is not correctly rounded: for float16(log 7) it gives 7.0026526 here, 1 ulp from the correctly
# rounded 7.0026531 that the fixture machine used. With the mixers' plain float32 exp, milkit AND
# the official code (rerun here as the README says) both missed the fixture by the same 5.5e-10 /
# 8.0e-10 / 3.9e-10 (srmamba / bimamba / mamba attention logits) while agreeing with each other
# to 1.9e-15. milkit now rounds a float64 exp once (``mamba_block.ssm_a``, the same A on every
# platform): ≤ 2.9e-15 against the fixtures, so the common float64 bound applies.

# fixture -> (official family, overrides the file cannot tell)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "abmil_ilse_attention": ("ilse", {}),
    "abmil_ilse_gated": ("ilse", {}),
    "clam_sb_small_gated": ("clam", {}),
    "clam_sb_small_plain": ("clam", {}),
    "dearcaat_dattention": ("mhim", {}),
    "transmil_szc_nystrom0014": ("transmil", {}),
    "transmil_szc_nystrom009_LEGACY": ("transmil", {"legacy_nystrom": True}),
    "mhim_v1_selfattn": ("mhim", {}),
    "r2t_rrtmil_region8": ("rrt", {}),
    "r2t_rrtmil_region16": ("rrt", {"region_num": 16}),
    "mambamil_srmamba": ("mambamil", {"backend": "torch"}),
    "mambamil_bimamba": ("mambamil", {"backend": "torch", "mixer": "bimamba"}),
    "mambamil_mamba": ("mambamil", {"backend": "torch"}),
    "aem_mha": ("aem", {"lamda": 0.1}),
    "aem_abmil": ("aem", {"lamda": 0.1}),
}


@cache
def _safetensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name))


@cache
def fixture(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(sidecar, official state, outputs, bags) of one fixture, as the README describes."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    if meta["file"].endswith(".npz"):
        arrays = np.load(FIXTURES / meta["file"], allow_pickle=False)
        own = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        state = torch.load(FIXTURES / meta["checkpoint_file"], map_location="cpu",
                           weights_only=True)  # fmt: skip
    else:
        own = _safetensors(meta["file"])
        src = (
            own if meta["state_file"] in (None, meta["file"]) else _safetensors(meta["state_file"])
        )
        state = {k: src["state." + k] for k in meta["state_keys"]}
    bags_src = own
    if "from" in meta["inputs"]:
        bags_src = _safetensors(meta["inputs"]["from"])
    bags = {b["key"]: bags_src[b["key"]] for b in meta["inputs"].get("bags", [])}
    return meta, state, own, bags


def _out(own: dict, quantity: str, bag_key: str) -> torch.Tensor:
    return own[f"output.{quantity}.{bag_key.split('.')[-1]}"]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.double()).abs().max())


def model_deltas(name: str, dtype: torch.dtype = torch.float64, **extra: Any) -> dict[str, float]:
    """Max |milkit − official| per quantity over the fixture's bags (model run in ``dtype``)."""
    family, overrides = CASES[name]
    _meta, state, own, bags = fixture(name)
    imported = models.load_official(state, family, **{**overrides, **extra})
    model = imported.model.to(dtype).eval()
    deltas: dict[str, float] = {}

    def note(q: str, value: float) -> None:
        deltas[q] = max(deltas.get(q, 0.0), value)

    for key, x in bags.items():
        with torch.no_grad():
            out = model(x.to(dtype)[None])
        assert out.logits.dtype == dtype  # no cast inside forward (fix 6)
        if name.startswith("abmil_ilse"):  # one sigmoid output -> [0; w] head
            note(
                "logits", _maxdiff(out.logits[:, 1:] - out.logits[:, :1], _out(own, "logits", key))
            )
        else:
            note("logits", _maxdiff(out.logits, _out(own, "logits", key)))
        if f"output.attention.{key.split('.')[-1]}" in own:
            shape = out.attention.shape
            note("attention", _maxdiff(out.attention, _out(own, "attention", key).reshape(shape)))
            note(
                "attention_logits",
                _maxdiff(out.attention_logits, _out(own, "attention_logits", key).reshape(shape)),
            )
        if f"derived.attention_logits.{key.split('.')[-1]}" in own:
            ref = own[f"derived.attention_logits.{key.split('.')[-1]}"]
            note("attention_logits", _maxdiff(out.attention_logits, ref))
        if name.startswith("aem_"):
            model.train()
            with torch.no_grad():
                term = model(x.to(dtype)[None]).aux_losses["aem_entropy"]
            model.eval()
            note("aem_loss_term", _maxdiff(term.reshape(-1), _out(own, "aem_loss_term", key)))
    return deltas


def _assert_f64(deltas: dict[str, float], f64: float = F64) -> None:
    for quantity, value in deltas.items():
        tol = AEM_TERM if quantity == "aem_loss_term" else f64
        assert value <= tol, f"{quantity}: max |Δ| = {value:.3g} > {tol:g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_to_official_float64(name):
    _assert_f64(model_deltas(name))


@pytest.mark.parametrize("name", ["abmil_ilse_gated", "transmil_szc_nystrom0014", "r2t_rrtmil_region8",
                                  "mambamil_srmamba", "aem_mha"])  # fmt: skip
def test_equal_to_official_float32(name):
    """milkit's float32 ``model(x)`` against the float64 outputs: observed <= 1.7e-6."""
    deltas = model_deltas(name, torch.float32)
    deltas.pop("aem_loss_term", None)
    assert max(deltas.values()) <= 1e-5, deltas


# ---------------------------------------------------------------- the "no" cases, both ways
@pytest.mark.slow
def test_transmil_legacy_nystrom_needed_for_the_pinned_environment():
    """TransMIL pins nystrom-attention 0.0.9: milkit's default (fixed library) differs on every
    bag (0.04-0.18); ``legacy_nystrom=True`` reproduces it (test_equal_to_official_float64)."""
    assert model_deltas("transmil_szc_nystrom009_LEGACY", legacy_nystrom=False)["logits"] > 0.04
    # and the legacy switch does not reproduce the fixed library's outputs
    assert model_deltas("transmil_szc_nystrom0014", legacy_nystrom=True)["logits"] > 0.04


def test_r2t_crmsa_keeps_8_regions_as_official():
    """Official CR-MSA ignores region_num (always 8×8); milkit's old behaviour ("same") differs
    at N = 150 and 400 (0.18 in logits)."""
    assert max(model_deltas("r2t_rrtmil_region16").values()) <= F64
    old = model_deltas("r2t_rrtmil_region16", crmsa_region_num="same")
    assert old["logits"] > 0.05 and old["attention_logits"] > 0.1


def _mhim_transmil(state: dict[str, torch.Tensor], **kwargs: Any) -> torch.nn.Module:
    """``mhim-transmil`` with the fixture's weights in student AND teacher (EMA at step 0)."""
    imported = models.load_official(state, "mhim")
    model = models.create("mhim-transmil", 1024, 2, **kwargs)
    model.student.load_state_dict(imported.state)
    model.teacher.load_state_dict(imported.state)
    return model.double().eval()


def _mhim_selfattn_deltas(**kwargs: Any) -> dict[str, float]:
    _meta, state, own, bags = fixture("mhim_v1_selfattn")
    model = _mhim_transmil(state, **kwargs)
    deltas: dict[str, float] = {}
    for key, x in bags.items():
        x = x.double()[None]
        with torch.no_grad():
            logits = model(x).logits
            t = model.teacher
            out = t.forward_embedded(t.embed_instances(x), None, attn_layer=0)
        pairs = {
            "logits": (logits, "logits"),
            "teacher_attention_layer0": (out.attention_logits, "teacher_attention_layer0"),
            "teacher_cls_feature": (out.embedding, "teacher_cls_feature"),
        }
        for q, (mine, ref) in pairs.items():
            deltas[q] = max(deltas.get(q, 0.0), _maxdiff(mine, _out(own, ref, key)))
    return deltas


@pytest.mark.slow
def test_mhim_transmil_is_the_official_selfattn_base():
    """Student logits, the teacher's layer-0 cls row (what v1 masks with) and its cls feature
    (the consistency target) equal MHIM-MIL's SAttention at every N, incl. non-square 7 and 50."""
    _assert_f64(_mhim_selfattn_deltas())
    _meta, state, _own, _bags = fixture("mhim_v1_selfattn")
    # Through the family mapping alone (milkit's standalone base model), too.
    assert models.load_official(state, "mhim").model_name == "transmil-sattention"


def test_szc_layout_is_not_the_selfattn_base():
    """The old mhim-transmil (szc TransMIL layout) differs at non-square N (report: 0.21)."""
    _meta, state, own, bags = fixture("mhim_v1_selfattn")
    imported = models.load_official(state, "mhim", layout="szc")
    model = imported.model.double().eval()
    with torch.no_grad():
        diff = _maxdiff(model(bags["input.x1"].double()[None]).logits, own["output.logits.x1"])
    assert diff > 0.1


def test_mhim_v2_class_aware_scores_follow_the_official_formula():
    """v2 ``get_pseudo_score_trans`` from the OFFICIAL layer-0 row and layer-1 values equals
    milkit's ``class_aware_scores`` (the masking scores of mhim-transmil v2)."""
    _meta, state, own, bags = fixture("mhim_v1_selfattn")
    teacher = _mhim_transmil(state, version="v2").teacher
    attn = teacher.layer1.attn
    for key, x in bags.items():
        h = teacher.embed_instances(x.double()[None])
        with torch.no_grad():
            mine = teacher.class_aware_scores(h)
            tokens = torch.cat([teacher.cls_token.expand(1, -1, -1), h], dim=1)
            v = teacher.layer1.norm(tokens) @ attn.to_qkv.weight[2 * 512 :].T
            v = rearrange(v, "b n (h d) -> b h n d", h=8)[:, :, 1:]
            row = _out(own, "teacher_attention_layer0", key)  # official (1, 8, N)
            feat = rearrange(torch.einsum("hnd,hn->hnd", v[0], row[0]), "h n d -> n (h d)")
            cam = attn.to_out(feat) @ teacher.head.weight.T + teacher.head.bias[0]
            ref = cam.softmax(dim=-1).amax(dim=-1)[None]
        assert _maxdiff(mine, ref) <= F64


def test_mhim_transmil_teacher_init_accepts_official_files(tmp_path):
    """An official MHIM-MIL selfattn state dict is a valid ``teacher_init`` (keys renamed)."""
    _meta, state, own, bags = fixture("mhim_v1_selfattn")
    path = tmp_path / "fold_0_model_best_auc.pt"
    torch.save({k: v.float() for k, v in state.items()}, path)
    model = models.create("mhim-transmil", 1024, 2, teacher_init=str(path), init_stu_type="all")
    model = model.double().eval()
    x = bags["input.x3"].double()[None]  # N = 50, not square
    with torch.no_grad():
        out = model.teacher.forward_embedded(model.teacher.embed_instances(x), None, attn_layer=0)
        assert _maxdiff(out.attention_logits, own["output.teacher_attention_layer0.x3"]) <= 1e-6
        assert _maxdiff(model(x).logits, own["output.logits.x3"]) <= 1e-6


# ------------------------------------------------------------------ MHIM shipped checkpoint
def test_mhim_shipped_c16_init_checkpoint_loads_and_matches():
    meta, _state, own, bags = fixture("mhim_c16_abmil_init_seed2021_fold0")
    path = FIXTURES / meta["checkpoint_file"]
    imported = models.load_official(path, "mhim")
    assert imported.model_name == "abmil-dattention"
    for dtype, tol in ((torch.float64, F64), (torch.float32, 1e-4)):
        model = imported.model.to(dtype)
        for key, x in bags.items():
            with torch.no_grad():
                out = model(x.to(dtype)[None])
            assert _maxdiff(out.logits, _out(own, "logits", key)) <= tol
            assert _maxdiff(out.attention, _out(own, "attention", key)) <= tol
            assert _maxdiff(out.attention_logits, _out(own, "attention_logits", key)) <= tol


def test_mhim_abmil_teacher_init_takes_the_shipped_file_as_is():
    """Fix 3: teacher_init used to refuse the shipped file; now its teacher equals the official
    pure model on the same bags."""
    meta, _state, own, bags = fixture("mhim_c16_abmil_init_seed2021_fold0")
    model = models.create(
        "mhim-abmil", 1024, 2, teacher_init=str(FIXTURES / meta["checkpoint_file"])
    )
    teacher = model.teacher.double().eval()
    for key, x in bags.items():
        with torch.no_grad():
            out = teacher(x.double()[None])
        assert _maxdiff(out.logits, _out(own, "logits", key)) <= F64


# ------------------------------------------------------------------------------ SupCon
@pytest.mark.parametrize("batch", ["b0", "b1", "b2", "b3"])
def test_supcon_equals_reference_implementation(batch):
    from milkit.models.layers.supcon import supcon_loss

    meta = json.loads((FIXTURES / "supcon_reference.json").read_text())
    data = _safetensors("supcon_reference.safetensors")
    z, y = data[f"input.features.{batch}"][:, 0], data[f"input.labels.{batch}"]
    for cfg, taus in meta["constructor"]["configs"].items():
        ref = data[f"output.loss.{batch}.{cfg}"]
        loss, _ = supcon_loss(z, y, taus["temperature"], base_temperature=taus["base_temperature"])
        assert loss.dtype == torch.float64
        assert _maxdiff(loss.reshape(1), ref) <= F64, (batch, cfg)


def test_supcon_paper_normalisation_differs_where_an_anchor_has_no_positive():
    from milkit.models.layers.supcon import supcon_loss

    data = _safetensors("supcon_reference.safetensors")
    z, y = data["input.features.b0"][:, 0], data["input.labels.b0"]  # anchor 5 has no positive
    ref = float(data["output.loss.b0.c0"])  # tau = base_tau = 0.1
    paper, n = supcon_loss(z, y, 0.1, normalization="paper")
    assert n == 5
    assert abs(float(paper) - ref) > 0.2
    assert abs(float(paper) * 5 / 6 - ref) <= F64  # the B / anchors-with-positive factor
