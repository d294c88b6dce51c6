"""``load_official`` / ``milkit import-weights``: strict, declarative official-key mapping.

Uses synthetic official-style state dicts (built from the official key names and shapes), so it
runs without the fidelity folder; the numerical equality with the official modules is in
``test_fidelity.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milkit import models
from milkit.errors import MilkitError
from milkit.models.official import FAMILIES, get_family


def clam_sb_state(gated: bool = True, d: int = 16, prefix: str = "") -> dict[str, torch.Tensor]:
    """A CLAM_SB state dict under CLAM's names (size "small": 512 / 256)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    s = {"attention_net.0.weight": r(512, d), "attention_net.0.bias": r(512)}
    if gated:
        for b in ("attention_a.0", "attention_b.0"):
            s[f"attention_net.3.{b}.weight"], s[f"attention_net.3.{b}.bias"] = r(256, 512), r(256)
        s["attention_net.3.attention_c.weight"] = r(1, 256)
        s["attention_net.3.attention_c.bias"] = r(1)
    else:
        s["attention_net.3.module.0.weight"], s["attention_net.3.module.0.bias"] = (
            r(256, 512),
            r(256),
        )
        s["attention_net.3.module.3.weight"], s["attention_net.3.module.3.bias"] = r(1, 256), r(1)
    s["classifiers.weight"], s["classifiers.bias"] = r(2, 512), r(2)
    for i in range(2):
        s[f"instance_classifiers.{i}.weight"], s[f"instance_classifiers.{i}.bias"] = r(2, 512), r(2)
    return {prefix + k: v for k, v in s.items()}


def clam_sb_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CLAM_SB's forward (eval) written from model_clam.py, gated: logits (1, 2)."""
    h = torch.relu(x @ s["attention_net.0.weight"].T + s["attention_net.0.bias"])
    a = torch.tanh(
        h @ s["attention_net.3.attention_a.0.weight"].T + s["attention_net.3.attention_a.0.bias"]
    )
    b = torch.sigmoid(
        h @ s["attention_net.3.attention_b.0.weight"].T + s["attention_net.3.attention_b.0.bias"]
    )
    att = (a * b) @ s["attention_net.3.attention_c.weight"].T + s[
        "attention_net.3.attention_c.bias"
    ]
    m = torch.softmax(att.T, dim=1) @ h
    return m @ s["classifiers.weight"].T + s["classifiers.bias"]


def test_clam_dataparallel_prefix_and_instance_classifiers():
    """CLAM's own demo checkpoint has DataParallel ``module.`` prefixes: they are unwrapped,
    every weight (instance classifiers included) lands in ``clam-sb``, the forward equals
    CLAM's."""
    state = clam_sb_state(prefix="module.")
    imported = models.load_official(state, "clam")
    assert imported.model_name == "clam-sb" and imported.model_kwargs["gate"] is True
    x = torch.randn(9, 16)
    plain = {k[len("module.") :]: v for k, v in state.items()}
    own = imported.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.items())  # instance classifiers too
    with torch.no_grad():
        assert torch.allclose(imported.model(x[None]).logits, clam_sb_forward(plain, x), atol=1e-6)


def test_clam_demo_checkpoint_layout_inner_dataparallel_and_svm_buffer():
    """CLAM's shipped demo checkpoint (heatmaps/demo/ckpts/s_0_checkpoint.pt) wraps only
    ``attention_net`` in DataParallel (``attention_net.module.0.weight``) and stores the smooth-SVM
    loss buffer ``instance_loss_fn.labels``: both handled, said, and the forward equals CLAM's."""
    plain = clam_sb_state()
    demo = {k.replace("attention_net.", "attention_net.module.", 1): v for k, v in plain.items()}
    demo["instance_loss_fn.labels"] = torch.tensor([0, 1])
    imported = models.load_official(demo, "clam")
    assert any("DataParallel" in n and "attention_net" in n for n in imported.notes)
    assert any("instance_loss_fn.labels" in n for n in imported.notes)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(imported.model(x[None]).logits, clam_sb_forward(plain, x), atol=1e-6)
    # the plain (Attn_Net) layout keeps its own ".module" after the inner unwrap
    plain_attn = clam_sb_state(gated=False)
    demo_plain = {
        k.replace("attention_net.", "attention_net.module.", 1): v for k, v in plain_attn.items()
    }
    assert models.load_official(demo_plain, "clam").model_kwargs["gate"] is False
    from milkit.models.abmil import state_dict_from_clam

    assert set(state_dict_from_clam(demo)) == set(models.create("abmil-gated", 16, 2).state_dict())


def test_clam_plain_variant_is_detected():
    imported = models.load_official(clam_sb_state(gated=False), "clam")
    assert imported.model_name == "clam-sb" and imported.model_kwargs["gate"] is False
    assert (imported.in_dim, imported.num_classes) == (16, 2)


def test_unmapped_official_key_is_an_error_listing_it():
    state = clam_sb_state()
    state["attention_net.3.extra.weight"] = torch.zeros(3)
    with pytest.raises(MilkitError, match=r"attention_net\.3\.extra\.weight"):
        models.load_official(state, "clam")
    # on explicit request it is dropped and reported
    imported = models.load_official(state, "clam", ignore=["attention_net.3.extra.*"])
    assert any("ignored on request" in n for n in imported.notes)


def test_missing_official_key_is_an_error_naming_the_milkit_parameter():
    state = clam_sb_state()
    del state["attention_net.3.attention_c.bias"]
    with pytest.raises(MilkitError, match=r"attention_net\.3\.attention_c\.bias"):
        models.load_official(state, "clam")


def test_shape_mismatch_is_an_error_nothing_loaded():
    state = clam_sb_state()
    state["attention_net.3.attention_c.weight"] = torch.zeros(1, 100)  # attn_dim inferred 100
    with pytest.raises(MilkitError, match="shapes differ"):
        models.load_official(state, "clam")


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("pre_2024", [False, True])
@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_every_clam_layout_is_detected_and_loads_exactly(name, gate, size, pre_2024):
    """CLAM_SB/MB, gated or not, small or big, and CLAM's pre-2024 layout of a run without
    dropout (attention module at ``attention_net.2``, plain attention's last Linear at
    ``module.2``): milkit's clam-* keeps CLAM's key names (checked against the official modules
    in test_clam.py), so each file is rebuilt with the options it was trained with."""
    torch.manual_seed(0)
    dropout = 0.0 if pre_2024 else 0.25
    model = models.create(name, 24, 3, gate=gate, size=size, dropout=dropout)
    milkit_state = model.state_dict()
    official = dict(milkit_state)
    if pre_2024:
        official = {k.replace("attention_net.3.", "attention_net.2.", 1): v
                    for k, v in milkit_state.items()}  # fmt: skip
    imported = models.load_official(official, "clam")
    assert imported.model_name == name
    assert imported.model_kwargs["gate"] is gate and imported.model_kwargs["size"] == size
    assert imported.model_kwargs.get("dropout", 0.25) == dropout
    assert (imported.in_dim, imported.num_classes) == (24, 3)
    assert any("before 2024-04" in n for n in imported.notes) is pre_2024
    own = imported.model.state_dict()
    assert own.keys() == milkit_state.keys()
    assert all(torch.equal(own[k], milkit_state[k]) for k in milkit_state)
    x = torch.randn(1, 11, 24)
    with torch.no_grad():
        assert torch.equal(imported.model(x).logits, model.eval()(x).logits)


def test_clam_mb_of_the_broken_2024_04_commits_is_refused():
    """CLAM commits 2024-04-06…11 built CLAM_MB with one classifier Linear and C attention
    branches (C × C logits): refused with the reason, nothing loaded."""
    state = clam_sb_state()
    state["attention_net.3.attention_c.weight"] = torch.zeros(2, 256)
    state["attention_net.3.attention_c.bias"] = torch.zeros(2)
    with pytest.raises(MilkitError, match="2024-04-06"):
        models.load_official(state, "clam")


def test_wrong_family_lists_expected_keys():
    with pytest.raises(MilkitError, match="do not look like any transmil"):
        models.load_official(clam_sb_state(), "transmil")
    with pytest.raises(MilkitError, match="unknown official code family"):
        models.load_official(clam_sb_state(), "nope")


def mhim_gated_state(d: int = 1024) -> dict[str, torch.Tensor]:
    """Keys and shapes of MHIM-MIL's shipped TCGA ABMIL init files (gated, no biases)."""
    g = torch.Generator().manual_seed(1)
    return {
        "patch_to_emb.0.weight": torch.randn(512, d, generator=g) * 0.03,
        "patch_to_emb.0.bias": torch.randn(512, generator=g) * 0.03,
        "online_encoder.attention.attention_a.0.weight": torch.randn(128, 512, generator=g) * 0.05,
        "online_encoder.attention.attention_b.0.weight": torch.randn(128, 512, generator=g) * 0.05,
        "online_encoder.attention.attention_c.weight": torch.randn(1, 128, generator=g) * 0.1,
        "predictor.weight": torch.randn(2, 512, generator=g) * 0.05,
        "predictor.bias": torch.randn(2, generator=g) * 0.05,
    }


def test_mhim_gated_init_checkpoint_is_detected_and_said():
    s = mhim_gated_state()
    imported = models.load_official(s, "mhim")
    assert imported.model_kwargs["gated"] is True
    assert any("GATED" in n and "strict=False" in n for n in imported.notes)
    # official AttentionGated: relu(V h) ⊙ sigmoid(U h) (act = --da_act default relu), no biases
    x = torch.randn(1, 6, 1024)
    h = torch.relu(x @ s["patch_to_emb.0.weight"].T + s["patch_to_emb.0.bias"])
    a = torch.relu(h @ s["online_encoder.attention.attention_a.0.weight"].T)
    b = torch.sigmoid(h @ s["online_encoder.attention.attention_b.0.weight"].T)
    att = torch.softmax(((a * b) @ s["online_encoder.attention.attention_c.weight"].T)[..., 0], -1)
    ref = (att[:, None] @ h)[:, 0] @ s["predictor.weight"].T + s["predictor.bias"]
    with torch.no_grad():
        assert torch.allclose(imported.model(x).logits, ref, atol=1e-5)


def test_mhim_teacher_init_refuses_gated_file_for_non_gated_model_and_takes_it_gated(tmp_path):
    """The v1 code loads the gated TCGA files into a non-gated teacher with strict=False (random
    attention, silently): milkit names that case, and ``gated=True`` loads it."""
    path = tmp_path / "fold_0_model_best_auc.pt"
    torch.save(mhim_gated_state(), path)
    with pytest.raises(MilkitError, match="GATED"):
        models.create("mhim-abmil", 1024, 2, teacher_init=str(path))
    model = models.create("mhim-abmil", 1024, 2, teacher_init=str(path), gated=True)
    proj = model.teacher.pool.proj.weight
    s = mhim_gated_state()
    expected = torch.cat(
        [
            s["online_encoder.attention.attention_a.0.weight"],
            s["online_encoder.attention.attention_b.0.weight"],
        ]
    )
    assert torch.equal(proj, expected)
    assert torch.equal(model.student.fc[0].weight, s["patch_to_emb.0.weight"])  # init_stu_type fc


def test_every_family_has_a_mapping_and_aliases_resolve():
    assert {f.name for f in FAMILIES} == {
        "clam",
        "clam-abmil",
        "ilse",
        "transmil",
        "mhim",
        "rrt",
        "mambamil",
        "aem",
        "dsmil",
    }
    assert get_family("AttentionDeepMIL").name == "ilse"
    assert get_family("dsmil_wsi").name == "dsmil"
    assert get_family("rrt_mil").name == "rrt"
    for fam in FAMILIES:
        for v in fam.variants:
            assert v.model is None or v.model in models.list_models(), v.model


def test_read_state_refuses_milkit_checkpoints(tmp_path):
    from milkit.io.checkpoint import save_checkpoint

    model = models.create("abmil", 8, 2)
    save_checkpoint(tmp_path / "best.pt", model, {"model_name": "abmil"})
    with pytest.raises(MilkitError, match="already a milkit checkpoint"):
        models.load_official(tmp_path / "best.pt", "clam")


# ---------------------------------------------------------------------------------- CLI
def test_cli_import_weights_run_folder_works_with_predict(tmp_path, capsys):
    from milkit.cli import main
    from milkit.data.datasets import BagDataset
    from milkit.io.bags import write_bag
    from milkit.training.inference import load_checkpoint, predict_run

    src = tmp_path / "s_0_checkpoint.pt"
    state = clam_sb_state(prefix="module.")
    torch.save(state, src)
    run = tmp_path / "run"
    rc = main(["import-weights", str(src), "--family", "clam", "--out", str(run),
               "--class-names", "normal,tumor"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "clam-sb" in err and "k_sample" in err
    _model, meta = load_checkpoint(run / "fold_0" / "best.pt")
    assert meta["class_names"] == ["normal", "tumor"]
    assert meta["imported_from"]["family"] == "clam"
    feats = np.random.default_rng(0).normal(size=(11, 16)).astype("float32")
    coords = np.stack(np.meshgrid(np.arange(11), [0]), -1).reshape(-1, 2) * 256
    bag = write_bag(tmp_path / "bags" / "s1.h5", feats, coords)
    preds = predict_run(run, BagDataset([bag], slide_ids=["s1"]))
    plain = {k[len("module.") :]: v for k, v in state.items()}
    x = torch.from_numpy(feats)
    ref = torch.softmax(clam_sb_forward(plain, x), dim=1).numpy()
    assert np.allclose(preds.probs, ref, atol=1e-5)
    # a second import into the same place needs --force
    assert main(["import-weights", str(src), "--family", "clam", "--out", str(run)]) == 2


def test_cli_import_weights_checkpoint_is_a_teacher_init(tmp_path):
    from milkit.cli import main

    src = tmp_path / "tcga_fold_0.pt"
    torch.save(mhim_gated_state(), src)
    out = tmp_path / "teacher.pt"
    assert main(["import-weights", str(src), "--family", "mhim", "--out", str(out)]) == 0
    model = models.create("mhim-abmil", 1024, 2, teacher_init=str(out), gated=True)
    assert torch.equal(model.teacher.head.weight, mhim_gated_state()["predictor.weight"])


def test_load_checkpoint_of_an_official_file_points_to_import_weights(tmp_path):
    from milkit.training.inference import load_checkpoint

    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(clam_sb_state(prefix="module."), path)
    with pytest.raises(MilkitError, match="milkit import-weights"):
        load_checkpoint(path)
