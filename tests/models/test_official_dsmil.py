"""``load_official(..., "dsmil")`` / ``milkit import-weights --family dsmil``: DSMIL weights saved
by binli123/dsmil-wsi (``train_tcga.py``: ``torch.save(milnet.state_dict(), "fold_k_r.pth")`` of
``MILNet(FCLayer, BClassifier)``).

The state dicts are built under the official key names and shapes of ``dsmil.py``; the reference
forward below is written from ``dsmil.py`` (``MILNet.forward`` → ``FCLayer`` → ``BClassifier``),
so these tests need neither the official code nor the fidelity folder. (Checked once against the
official modules, current ``dsmil.py`` and the 2021 one, and against the repo's shipped
``example_aggregator_weights``: max |Δ| ≤ 1.6e-15 in float64.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from milkit import models
from milkit.errors import MilkitError

F64 = 1e-12


def dsmil_state(
    outputs: int,
    d: int = 24,
    *,
    nonlinear: bool = True,
    passing_v: bool = False,
    lin: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A MILNet state dict under dsmil.py's names (q is 128-wide, hard-coded in BClassifier)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.2).double()

    s = {"i_classifier.fc.0.weight": r(outputs, d), "i_classifier.fc.0.bias": r(outputs)}
    if lin:  # dsmil.py 2022-02-02 … 2022-09-18 with --non_linearity 1
        s["b_classifier.lin.0.weight"], s["b_classifier.lin.0.bias"] = r(d, d), r(d)
        s["b_classifier.q.0.weight"], s["b_classifier.q.0.bias"] = r(128, d), r(128)
    elif nonlinear:
        s["b_classifier.q.0.weight"], s["b_classifier.q.0.bias"] = r(128, d), r(128)
        s["b_classifier.q.2.weight"], s["b_classifier.q.2.bias"] = r(128, 128), r(128)
    else:
        s["b_classifier.q.weight"], s["b_classifier.q.bias"] = r(128, d), r(128)
    if passing_v or lin:
        s["b_classifier.v.1.weight"], s["b_classifier.v.1.bias"] = r(d, d), r(d)
    s["b_classifier.fcc.weight"], s["b_classifier.fcc.bias"] = r(outputs, outputs, d), r(outputs)
    return s


def dsmil_forward(
    s: dict[str, torch.Tensor], x: torch.Tensor, value_relu: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dsmil.py ``MILNet.forward`` (eval) on one bag x (N, D): (instance scores (N, O), bag
    scores (1, O), attention A (N, O))."""
    classes = x @ s["i_classifier.fc.0.weight"].T + s["i_classifier.fc.0.bias"]

    def q(h: torch.Tensor) -> torch.Tensor:
        if "b_classifier.q.2.weight" in s:
            h = torch.relu(h @ s["b_classifier.q.0.weight"].T + s["b_classifier.q.0.bias"])
            return torch.tanh(h @ s["b_classifier.q.2.weight"].T + s["b_classifier.q.2.bias"])
        return h @ s["b_classifier.q.weight"].T + s["b_classifier.q.bias"]

    values = x
    if "b_classifier.v.1.weight" in s:
        values = x @ s["b_classifier.v.1.weight"].T + s["b_classifier.v.1.bias"]
        values = torch.relu(values) if value_relu else values
    queries = q(x)
    _, m_indices = torch.sort(classes, 0, descending=True)
    q_max = q(torch.index_select(x, 0, m_indices[0, :]))
    scale = torch.sqrt(torch.tensor(queries.shape[1], dtype=torch.float32))
    attention = F.softmax(queries @ q_max.T / scale, 0)
    bag = (attention.T @ values)[None]  # (1, O, D)
    scores = F.conv1d(bag, s["b_classifier.fcc.weight"], s["b_classifier.fcc.bias"]).view(1, -1)
    return classes, scores, attention


def assert_equals_official(
    imported, state: dict[str, torch.Tensor], outputs: int, value_relu: bool = True
) -> None:
    """Bag scores, attention and instance scores of the import equal dsmil.py's (float64)."""
    model = imported.model.double().eval()
    neg = model.negative_class
    d = imported.in_dim
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 60):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        classes, scores, attention = dsmil_forward(state, x, value_relu)
        with torch.no_grad():
            out = model(x[None])
        logits = out.logits[:, 1:] if neg else out.logits
        assert (out.logits[:, 0] == 0).all() or not neg
        assert float((logits - scores).abs().max()) <= F64
        att = out.attention[:, None] if outputs == 1 else out.attention  # (1, O, N)
        assert float((att[0].T - attention).abs().max()) <= F64
        inst = out.instance_logits[0][:, 1:] if neg else out.instance_logits[0]
        assert float((inst - classes).abs().max()) <= F64


@pytest.mark.parametrize(
    ("outputs", "nonlinear", "passing_v", "variant"),
    [
        (1, True, False, "nonlinear q (dsmil.py since 2022-09-18, train_tcga.py default)"),
        (2, True, False, "nonlinear q (dsmil.py since 2022-09-18, train_tcga.py default)"),
        (2, True, True, "nonlinear q, passing_v value network"),
        (3, False, False, "linear q (dsmil.py since 2022-09-18, --non_linearity 0)"),
    ],
)
def test_every_current_layout_is_detected_and_equals_dsmil_py(
    outputs, nonlinear, passing_v, variant
):
    state = dsmil_state(outputs, nonlinear=nonlinear, passing_v=passing_v)
    imported = models.load_official(state, "dsmil")
    assert imported.model_name == "dsmil" and variant in imported.variant
    kw = imported.model_kwargs
    assert (kw["nonlinear"], kw["passing_v"], kw["q_dim"]) == (nonlinear, passing_v, 128)
    # one sigmoid output (Camelyon16, --num_classes 1) → 2 classes [0, s]; O ≥ 2 → O classes
    assert kw["negative_class"] is (outputs == 1)
    assert (imported.in_dim, imported.num_classes) == (24, max(outputs, 2))
    assert any("sigmoid outputs" in n for n in imported.notes)
    assert_equals_official(imported, state, outputs)


def test_2021_layout_has_no_value_relu_and_the_choice_matters():
    """Every dsmil.py before 2022-09-18 (the CVPR 2021 code) has a linear q and a value Linear
    WITHOUT ReLU; the current code's nonlinear=False, passing_v=True has the same keys WITH it.
    The 2021 layout is assumed and said; value_relu=True rebuilds the newer one."""
    state = dsmil_state(1, nonlinear=False, passing_v=True)
    imported = models.load_official(state, "dsmil")
    assert imported.model_kwargs["value_relu"] is False
    assert any("value_relu=True" in n for n in imported.notes)
    assert_equals_official(imported, state, 1, value_relu=False)
    newer = models.load_official(state, "dsmil", value_relu=True)
    assert_equals_official(newer, state, 1, value_relu=True)
    x = torch.randn(1, 30, 24, dtype=torch.float64)
    with torch.no_grad():
        a = imported.model.double()(x).logits
        b = newer.model.double()(x).logits
    assert float((a - b).abs().max()) > 1e-3  # not a detail: the keys cannot tell, the note does


def test_negative_class_override_adds_class_zero():
    """TCGA-style runs with a negative label (label = num_classes, all-zero target): O outputs
    become O + 1 classes with class 0 negative (logits [0, s])."""
    state = dsmil_state(2)
    imported = models.load_official(state, "dsmil", negative_class=True)
    assert imported.num_classes == 3 and imported.model.outputs == 2
    assert_equals_official(imported, state, 2)


def test_dataparallel_prefix_and_pth_file(tmp_path):
    """A ``.pth`` as train_tcga.py writes it (plain state dict), also with ``module.`` keys."""
    state = dsmil_state(2, passing_v=True)
    path = tmp_path / "fold_0_1.pth"
    torch.save({"module." + k: v.float() for k, v in state.items()}, path)
    imported = models.load_official(path, "dsmil")
    assert imported.model_kwargs["passing_v"] is True
    own = imported.model.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k].float()) for k in state)


def test_lin_layout_of_2022_is_refused_with_the_reason():
    with pytest.raises(MilkitError, match=r"lin.*2022-02-02") as err:
        models.load_official(dsmil_state(1, lin=True), "dsmil")
    assert "no such" in str(err.value)


def test_strict_missing_unexpected_and_misshapen_keys_are_named():
    state = dsmil_state(2)
    del state["b_classifier.fcc.bias"]
    with pytest.raises(MilkitError, match=r"not in the file: b_classifier\.fcc\.bias"):
        models.load_official(state, "dsmil")
    state = dsmil_state(2)
    state["b_classifier.extra.weight"] = torch.zeros(3)
    with pytest.raises(MilkitError, match=r"the model lacks: b_classifier\.extra\.weight"):
        models.load_official(state, "dsmil")
    state = dsmil_state(2)
    state["b_classifier.fcc.weight"] = torch.zeros(2, 2, 23)
    with pytest.raises(MilkitError, match=r"shapes differ.*b_classifier\.fcc\.weight"):
        models.load_official(state, "dsmil")
    state = dsmil_state(2)
    state["classifier.weight"] = torch.zeros(2, 24)  # no rule maps a key outside the two streams
    with pytest.raises(MilkitError, match=r"no milkit counterpart.*classifier\.weight"):
        models.load_official(state, "dsmil")
    # the repo's init.pth (q, v only; train_tcga.py loaded it with strict=False) is not a model
    partial = {k: v for k, v in dsmil_state(1, nonlinear=False, passing_v=True).items()
               if k.startswith("b_classifier.q") or k.startswith("b_classifier.v")}  # fmt: skip
    with pytest.raises(MilkitError, match="do not look like any dsmil"):
        models.load_official(partial, "dsmil")


# ---------------------------------------------------------------------------------- CLI
def test_cli_import_weights_dsmil_run_folder_and_checkpoint(tmp_path, capsys):
    """The import is a run folder that ``predict`` reads and a checkpoint that
    ``load_checkpoint`` rebuilds (value_relu / negative_class included), like other families."""
    from milkit.cli import main
    from milkit.data.datasets import BagDataset
    from milkit.io.bags import write_bag
    from milkit.training.inference import load_checkpoint, predict_run

    state = dsmil_state(1, d=16, nonlinear=False, passing_v=True)
    src = tmp_path / "fold_0_1.pth"
    torch.save({k: v.float() for k, v in state.items()}, src)
    run = tmp_path / "run"
    rc = main(["import-weights", str(src), "--family", "dsmil", "--out", str(run),
               "--class-names", "normal,tumor"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "dsmil" in err and "value_relu" in err
    feats = np.random.default_rng(0).normal(size=(11, 16)).astype("float32")
    coords = np.stack(np.meshgrid(np.arange(11), [0]), -1).reshape(-1, 2) * 256
    bag = write_bag(tmp_path / "bags" / "s1.h5", feats, coords)
    preds = predict_run(run, BagDataset([bag], slide_ids=["s1"]))
    _classes, scores, _att = dsmil_forward(
        {k: v.float() for k, v in state.items()}, torch.from_numpy(feats), value_relu=False
    )
    tumor = 1 / (1 + math.exp(-float(scores[0, 0])))  # the official bag probability σ(s)
    assert np.allclose(preds.probs[0], [1 - tumor, tumor], atol=1e-5)
    out = tmp_path / "dsmil.pt"
    assert main(["import-weights", str(src), "--family", "dsmil", "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta["model_kwargs"]["value_relu"] is False
    assert meta["imported_from"]["family"] == "dsmil"
    with torch.no_grad():
        logits = model(torch.from_numpy(feats)[None]).logits
    assert torch.allclose(logits[:, 1:], scores, atol=1e-5)
