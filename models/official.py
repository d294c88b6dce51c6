"""Weights trained with the papers' official code → milkit models (``load_official``).

One declarative table: per *family* (the official repository), the *variants* its checkpoints
come in, each with the keys that identify it, the milkit model it becomes, and the key mapping.
The mappings were checked against the official modules' outputs on the same weights and bags
(``tests/models/test_fidelity.py``; max |Δ| ≤ 3e-15 in float64).

Mapping rules (``Rule``), applied to every official key in order, first match wins:

- ``Rule("patch_to_emb.0.*", "fc.0.*")``: rename; ``*`` is the rest of the key;
- ``Rule("a.*", None, why)``: drop the key on purpose (no counterpart, e.g. CLAM's instance
  classifiers); reported in the import notes;
- ``Rule(("a.*", "b.*"), "pool.proj.*", "cat")``: concatenate ``a`` and ``b`` along dim 0 (rows
  of ``a`` first): gated attention's V and U Linears → milkit's fused ``[V; U]`` projection;
- ``Rule("classifier.0.*", "head.*", "sigmoid_head")``: a single-logit (sigmoid) head becomes a
  2-class softmax head ``[0; w]``, ``[0; b]`` (same probabilities: σ(s) = softmax([0, s])₁).

Loading is strict: an official key that no rule maps, a milkit parameter that nothing fills, or
a shape that differs raises ``MilkitError`` listing the keys. A checkpoint saved from
``nn.DataParallel`` (every key prefixed ``module.``) is unwrapped first.

Adding a family is adding one table entry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from milkit.errors import MilkitError

__all__ = [
    "FAMILIES",
    "Family",
    "OfficialImport",
    "Rule",
    "Variant",
    "convert_state",
    "detect_variant",
    "load_official",
    "match_variant",
    "read_state",
]


# (milkit key, dim) whose size gives the value, or a function of the converted state and the
# constructor arguments (inferred and overridden; e.g. DSMIL's negative_class adds a class).
ShapeSpec = tuple[str, int] | Callable[[Mapping[str, Tensor], Mapping[str, Any]], int]


@dataclass(frozen=True)
class Rule:
    """One mapping row: official key pattern(s) → milkit key pattern (None = drop)."""

    src: str | tuple[str, ...]
    dst: str | None
    op: str = "copy"  # "copy" | "cat" | "sigmoid_head"; for dst None: the reason it is dropped


@dataclass(frozen=True)
class Variant:
    """One kind of official checkpoint and the milkit model it becomes.

    Attributes:
        name: what the variant is (official class and options), shown to the user.
        signature: official keys that must all be present to pick this variant; an entry that
            is a tuple of keys is present when any of them is (layouts that differ by index).
        model: the registered milkit model, or None when milkit has no counterpart (``note``
            then says why and the import is refused).
        rules: the key mapping.
        overrides: fixed constructor arguments (the official hard-coded values).
        shapes: constructor arguments read from a mapped tensor: ``{arg: (milkit key, dim)}``.
        infer: constructor arguments that need more than one shape (layer counts, optional
            modules), from the mapped state.
        note: said to the user on every import of this variant.
    """

    name: str
    signature: tuple[str | tuple[str, ...], ...]
    model: str | None
    rules: tuple[Rule, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    infer: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None
    note: str = ""
    in_dim: ShapeSpec = ("fc.0.weight", 1)
    num_classes: ShapeSpec = ("head.weight", 0)


@dataclass(frozen=True)
class Family:
    """The official repository a checkpoint was trained with."""

    name: str
    source: str
    variants: tuple[Variant, ...]
    aliases: tuple[str, ...] = ()
    # Layout fixes before the rules: (state, notes, constructor arguments the layout implies).
    normalise: (
        Callable[[Mapping[str, Tensor]], tuple[dict[str, Tensor], list[str], dict[str, Any]]] | None
    ) = None


@dataclass
class OfficialImport:
    """Result of ``load_official``.

    Attributes:
        model: the milkit model with the official weights, in eval mode.
        model_name, model_kwargs: how to rebuild it (``models.create``), stored in checkpoints.
        in_dim, num_classes: input feature size D and number of classes C.
        family, variant: what was detected.
        notes: facts the user must know (dropped keys, settings not stored in the file).
        state: the converted state dict (milkit names).
    """

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    in_dim: int
    num_classes: int
    family: str
    variant: str
    notes: list[str]
    state: dict[str, Tensor]

    def checkpoint_meta(self, class_names: Sequence[str] | None = None, source: str = "") -> dict:
        """Metadata of a milkit checkpoint (as ``milkit train`` writes) for this import."""
        from milkit import __version__

        names = [str(c) for c in (class_names or range(self.num_classes))]
        if len(names) != self.num_classes:
            raise MilkitError(
                f"{len(names)} class names given for a {self.num_classes}-class model",
                value=list(names),
            )
        return {
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "class_names": names,
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "train_config": {},  # not trained by milkit
            "epoch": None,
            "score": None,
            "monitor": None,
            "milkit_version": __version__,
            "imported_from": {
                "family": self.family,
                "variant": self.variant,
                "source": source,
                "notes": list(self.notes),
            },
        }


# --------------------------------------------------------------------------- family table
def _clam_normalise(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], list[str], dict[str, Any]]:
    """CLAM before 2024-04 added the Dropout after the first Linear only with ``--drop_out``, so
    a run without it has the attention module at ``attention_net.2`` (and, plain, the attention's
    last Linear at ``module.2``); CLAM since then, and milkit's ``clam-*``, always keep the slot
    at index 3. Renumber, and rebuild without dropout, as the run was trained."""
    if any(k.startswith("attention_net.3.") for k in state) or not any(
        k.startswith("attention_net.2.") for k in state
    ):
        return dict(state), [], {}
    renamed = {re.sub(r"^attention_net\.2\.", "attention_net.3.", k): v for k, v in state.items()}
    note = "CLAM layout without dropout (before 2024-04): attention_net.2.* read as attention_net.3.*; built with dropout=0"
    return renamed, [note], {"dropout": 0.0}


def _clam_size(state: Mapping[str, Tensor]) -> dict[str, Any]:
    width = next(
        int(v.shape[0])
        for k, v in state.items()
        if k.endswith((".attention_a.0.weight", ".module.0.weight"))
    )
    sizes = {256: "small", 384: "big"}  # model_clam.py size_dict: [embed, 512, 256 | 384]
    if width not in sizes:
        raise MilkitError(f"CLAM attention width {width} is neither 'small' (256) nor 'big' (384)")
    return {"size": sizes[width]}


def _clam_sb(state: Mapping[str, Tensor]) -> dict[str, Any]:
    score = next(
        v
        for k, v in state.items()
        if k.endswith((".attention_c.weight", ".module.3.weight", ".module.2.weight"))
    )
    if score.shape[0] != 1:
        raise MilkitError(
            f"a single-branch CLAM classifier with {score.shape[0]} attention branches: the "
            "CLAM_MB of CLAM commits 2024-04-06…11 (its logits are C×C); it cannot be imported",
            hint="Retrain with CLAM after 2024-04-11, or use its CLAM_SB",
        )
    return _clam_size(state)


def _clam_mb_classes(state: Mapping[str, Tensor], _kwargs: Mapping[str, Any]) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("classifiers.")})


_CLAM_RULES = (
    Rule("attention_net.*", "attention_net.*"),
    Rule("classifiers.*", "classifiers.*"),
    Rule("instance_classifiers.*", "instance_classifiers.*"),
    Rule("instance_loss_fn.*", None, "CLAM's smooth-SVM instance loss buffer (training only)"),
)
_CLAM_NOTE = (
    "not stored in the file: k_sample (8), inst_loss ('svm'), bag_weight (0.7), subtyping "
    "(False) and the dropout rate (0.25 assumed when the file has the dropout layout); pass them "
    "as overrides to fine-tune with the run's own settings"
)
_CLAM_GATED = ("attention_net.3.attention_a.0.weight", "attention_net.2.attention_a.0.weight")
_CLAM_PLAIN = ("attention_net.3.module.0.weight", "attention_net.2.module.0.weight")


_CLAM_HEAD = (
    Rule("attention_net.0.*", "fc.0.*"),
    Rule("classifiers.*", "head.*"),
    Rule("instance_classifiers.*", None, "CLAM's instance classifiers (training-only clustering)"),
    Rule("instance_loss_fn.*", None, "CLAM's smooth-SVM instance loss buffer (training only)"),
)
_CLAM_SHAPES = {"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)}
_CLAM_ABMIL_NOTE = (
    "CLAM_SB maps onto milkit's ABMIL in CLAM's layout (same forward: logits and attention); "
    "the instance-level clustering branch is training-only and is dropped"
)

_MHIM_INPUT = (
    Rule("patch_to_emb.0.*", "fc.0.*"),  # v1 (ICCV 2023)
    Rule("feature.0.*", "fc.0.*"),  # v2 (master)
    Rule("predictor.*", "head.*"),
    Rule("merge.*", None, "MHIM v2 Global Recycle Network queries (training only)"),
)
_MHIM_NOTE = (
    "an MHIM-MIL checkpoint holds the student; milkit imports it as the base model (MHIM "
    "evaluates the student alone, so predictions are identical), usable as teacher_init"
)


def _infer_r2t(state: Mapping[str, Tensor]) -> dict[str, Any]:
    phi = state.get("encoder.cr_msa.attn.phi")
    mlp = phi is None
    crmsa_k = int(state["encoder.cr_msa.attn.phi.2.weight"].shape[0]) if mlp else phi.shape[1]
    n_rmsa = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    pe = state.get("encoder.layers.0.attn.attn.pe.weight")
    return {
        "crmsa_k": int(crmsa_k),
        "crmsa_mlp": mlp,
        "n_layers": n_rmsa + 1,
        "epeg_k": int(pe.shape[2]) if pe is not None else 0,
    }


def _infer_mamba(state: Mapping[str, Tensor]) -> dict[str, Any]:
    layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    bidirectional = "layers.0.1.conv1d_b.weight" in state
    w = state["layers.0.1.in_proj.weight"]
    return {
        "layers": layers,
        "mixer": "srmamba" if bidirectional else "mamba",
        "dim": int(w.shape[1]),
        "expand": int(w.shape[0]) // (2 * int(w.shape[1])),
        "d_state": int(state["layers.0.1.A_log"].shape[1]),
        "d_conv": int(state["layers.0.1.conv1d.weight"].shape[-1]),
    }


def _dsmil_infer(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """O sigmoid outputs: one (Camelyon16, ``--num_classes 1``) has an implicit negative class."""
    return {"negative_class": int(state["i_classifier.fc.0.weight"].shape[0]) == 1}


def _dsmil_classes(state: Mapping[str, Tensor], kwargs: Mapping[str, Any]) -> int:
    outputs = int(state["i_classifier.fc.0.weight"].shape[0])
    return outputs + 1 if kwargs.get("negative_class") else outputs


_DSMIL_RULES = (
    Rule("i_classifier.*", "i_classifier.*"),  # FCLayer.fc: milkit keeps the official names
    Rule("b_classifier.*", "b_classifier.*"),  # BClassifier q, v, fcc
)
_DSMIL_NOTE = (
    "DSMIL's bag and instance scores are sigmoid outputs: one output (Camelyon16, "
    "--num_classes 1) becomes 2 classes [0, s] (softmax(logits)[1] = σ(s), the official "
    "probability); O ≥ 2 outputs become O classes (softmax over the O scores: the argmax is the "
    "official one, the values are not its per-class sigmoids). If the run's labels had a "
    "negative class (label = num_classes, all-zero target), pass negative_class=True (O + 1 "
    "classes, class 0 negative). Not stored in the file: dropout_v (--dropout_node, inactive in "
    "eval) and the decision thresholds (the .json beside the .pth)"
)
_DSMIL_SIGNATURE = ("i_classifier.fc.0.weight", "b_classifier.fcc.weight")


def _dsmil_variant(
    name: str, q_key: str, value: bool, overrides: dict[str, Any], note: str = ""
) -> Variant:
    signature = (*_DSMIL_SIGNATURE, q_key) + (("b_classifier.v.1.weight",) if value else ())
    return Variant(
        name,
        signature,
        "dsmil",
        _DSMIL_RULES,
        overrides={**overrides, "passing_v": value},
        shapes={"q_dim": (q_key.replace(".2.", ".0."), 0)},
        infer=_dsmil_infer,
        note=" ".join(p for p in (note, _DSMIL_NOTE) if p),
        in_dim=("i_classifier.fc.0.weight", 1),
        num_classes=_dsmil_classes,
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        "clam",
        "mahmoodlab/CLAM models/model_clam.py",
        tuple(
            Variant(
                f"{cls}, {'gated attention (Attn_Net_Gated)' if gated else 'plain attention (Attn_Net, gate=False)'}",
                (_CLAM_GATED if gated else _CLAM_PLAIN, head),
                model,
                _CLAM_RULES,
                overrides={"gate": gated},
                infer=_clam_sb if model == "clam-sb" else _clam_size,
                note=_CLAM_NOTE,
                in_dim=("attention_net.0.weight", 1),
                num_classes=("classifiers.weight", 0) if model == "clam-sb" else _clam_mb_classes,
            )
            for cls, model, head in (
                ("CLAM_SB", "clam-sb", "classifiers.weight"),
                ("CLAM_MB", "clam-mb", "classifiers.0.weight"),
            )
            for gated in (True, False)
        ),
        normalise=_clam_normalise,
    ),
    Family(
        "clam-abmil",
        "mahmoodlab/CLAM models/model_clam.py, CLAM_SB into milkit's ABMIL (abmil/abmil-gated)",
        (
            Variant(
                "CLAM_SB, gated attention (Attn_Net_Gated)",
                ("attention_net.3.attention_a.0.weight", "classifiers.weight"),
                "abmil-gated",
                (
                    Rule(
                        ("attention_net.3.attention_a.0.*", "attention_net.3.attention_b.0.*"),
                        "pool.proj.*",
                        "cat",
                    ),
                    Rule("attention_net.3.attention_c.*", "pool.score.*"),
                    *_CLAM_HEAD,
                ),
                shapes=_CLAM_SHAPES,
                note=_CLAM_ABMIL_NOTE,
            ),
            Variant(
                "CLAM_SB, plain attention (Attn_Net, gate=False)",
                ("attention_net.3.module.0.weight", "classifiers.weight"),
                "abmil",
                (
                    Rule("attention_net.3.module.0.*", "pool.proj.*"),
                    Rule("attention_net.3.module.3.*", "pool.score.*"),
                    *_CLAM_HEAD,
                ),
                shapes=_CLAM_SHAPES,
                note=_CLAM_ABMIL_NOTE,
            ),
            Variant(
                "CLAM_MB (one attention branch and one classifier per class)",
                ("classifiers.0.weight",),
                None,
                note="CLAM_MB's per-class attention and classifiers are not ABMIL: import it "
                "with family 'clam' (milkit clam-mb)",
            ),
        ),
        aliases=("clam-sb-abmil",),
    ),
    Family(
        "ilse",
        "AMLab-Amsterdam/AttentionDeepMIL model.py",
        (
            Variant(
                "GatedAttention",
                ("attention_V.0.weight", "attention_w.weight"),
                "abmil-ilse",
                (
                    Rule("feature_extractor_part2.0.*", "fc.0.*"),
                    Rule(("attention_V.0.*", "attention_U.0.*"), "pool.proj.*", "cat"),
                    Rule("attention_w.*", "pool.score.*"),
                    Rule("classifier.0.*", "head.*", "sigmoid_head"),
                ),
                overrides={"gated": True},
                shapes={"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
                note="the single sigmoid output becomes a 2-class head [0; w]: "
                "softmax(logits)[1] equals the official Y_prob",
            ),
            Variant(
                "Attention",
                ("attention.0.weight", "attention.2.weight", "classifier.0.weight"),
                "abmil-ilse",
                (
                    Rule("feature_extractor_part2.0.*", "fc.0.*"),
                    Rule("attention.0.*", "pool.proj.*"),
                    Rule("attention.2.*", "pool.score.*"),
                    Rule("classifier.0.*", "head.*", "sigmoid_head"),
                ),
                overrides={"gated": False},
                shapes={"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
                note="the single sigmoid output becomes a 2-class head [0; w]: "
                "softmax(logits)[1] equals the official Y_prob",
            ),
        ),
        aliases=("attentiondeepmil", "abmil-ilse"),
    ),
    Family(
        "transmil",
        "szc19990412/TransMIL models/TransMIL.py",
        (
            Variant(
                "TransMIL",
                ("_fc1.0.weight", "pos_layer.proj.weight", "cls_token"),
                "transmil",
                (
                    Rule("_fc1.0.*", "fc.0.*"),
                    Rule("_fc2.*", "head.*"),
                    Rule("cls_token", "cls_token"),
                    Rule("layer1.*", "layer1.*"),
                    Rule("layer2.*", "layer2.*"),
                    Rule("pos_layer.*", "pos_layer.*"),
                    Rule("norm.*", "norm.*"),
                ),
                note="TransMIL pins nystrom-attention 0.0.9, whose padding bug shifts every "
                "output; milkit follows the fixed library (>= 0.0.10). If these weights were "
                "trained in the pinned environment, pass legacy_nystrom=True to reproduce "
                "its outputs",
            ),
        ),
    ),
    Family(
        "mhim",
        "DearCaat/MHIM-MIL (v1 branch modules/mhim.py, master modules/mhim.py)",
        (
            Variant(
                "MHIM(baseline='attn') / --model=pure: DAttention ABMIL",
                ("online_encoder.attention.attention.0.weight", "predictor.weight"),
                "abmil-dattention",
                (
                    *_MHIM_INPUT,
                    Rule("online_encoder.attention.attention.0.*", "pool.proj.*"),
                    Rule("online_encoder.attention.attention.2.*", "pool.score.*"),
                ),
                shapes={"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
                note=_MHIM_NOTE + "; DAttention's activation is not stored: relu "
                "(--da_act default) is assumed, pass attn_act='gelu'/'tanh' if trained so",
            ),
            Variant(
                "gated DAttention ABMIL (the shipped TCGA init checkpoints)",
                ("online_encoder.attention.attention_a.0.weight", "predictor.weight"),
                "abmil-dattention",
                (
                    *_MHIM_INPUT,
                    Rule(
                        (
                            "online_encoder.attention.attention_a.0.*",
                            "online_encoder.attention.attention_b.0.*",
                        ),
                        "pool.proj.*",
                        "cat",
                    ),
                    Rule("online_encoder.attention.attention_c.*", "pool.score.*"),
                ),
                overrides={"gated": True},
                shapes={"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
                note="GATED attention (attention_a/b/c): MHIM-MIL v1 builds a NON-gated "
                "teacher and loads this file with strict=False, which silently leaves the "
                "teacher's attention random; milkit builds the gated model (relu ⊙ sigmoid, "
                "AttentionGated with the --da_act default relu). Use it with "
                "mhim-abmil gated=True. " + _MHIM_NOTE,
            ),
            Variant(
                "MHIM(baseline='selfattn'): SAttention TransMIL",
                ("online_encoder.cls_token", "predictor.weight"),
                "transmil-sattention",
                (
                    *_MHIM_INPUT,
                    Rule("online_encoder.cls_token", "cls_token"),
                    Rule("online_encoder.layer1.*", "layer1.*"),
                    Rule("online_encoder.layer2.*", "layer2.*"),
                    Rule("online_encoder.pos_embedding.*", "pos_layer.*"),
                    Rule("online_encoder.norm.*", "norm.*"),
                ),
                shapes={"dim": ("fc.0.weight", 0)},
                note=_MHIM_NOTE,
            ),
            Variant(
                "MHIM(baseline='dsmil')",
                ("online_encoder.i_classifier.0.weight",),
                None,
                note="MHIM-MIL's DSMIL base has no milkit counterpart in this family yet",
            ),
            Variant(
                "MHIM-MIL v2 ABMIL baseline (modules/abmil.py DAttention)",
                ("feature.0.weight", "attention.0.weight", "classifier.weight"),
                "abmil",
                (
                    Rule("feature.0.*", "fc.0.*"),
                    Rule("attention.0.*", "pool.proj.*"),
                    Rule("attention.2.*", "pool.score.*"),
                    Rule("classifier.*", "head.*"),
                ),
                overrides={"attn_dropout": 0.0},
                shapes={"fc_dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
            ),
        ),
        aliases=("mhim-mil", "mhim-v1", "mhim-v2"),
    ),
    Family(
        "rrt",
        "DearCaat/RRT-MIL modules/rrt.py",
        (
            Variant(
                "RRTMIL (R²T encoder + DAttention)",
                ("online_encoder.norm.weight", "pool_fn.attention.attention.0.weight"),
                "r2t-abmil",
                (
                    Rule("patch_to_emb.0.*", "fc.0.*"),
                    Rule("online_encoder.*", "encoder.*"),
                    Rule("pool_fn.attention.attention.0.*", "pool.proj.*"),
                    Rule("pool_fn.attention.attention.2.*", "pool.score.*"),
                    Rule("predictor.*", "head.*"),
                ),
                shapes={"dim": ("fc.0.weight", 0), "attn_dim": ("pool.score.weight", 1)},
                infer=_infer_r2t,
                note="not stored in the file: region_num (8), n_heads / crmsa_heads (8), "
                "all_shortcut (False) and da_act (tanh, as the README commands; the argparse "
                "default is relu); pass them if the run used others",
            ),
        ),
        aliases=("rrt-mil", "r2t", "r2t-mil"),
    ),
    Family(
        "mambamil",
        "isyangshu/MambaMIL models/MambaMIL.py",
        (
            Variant(
                "MambaMIL",
                ("_fc1.0.weight", "layers.0.1.in_proj.weight", "classifier.weight"),
                "mambamil",
                (
                    Rule("_fc1.0.*", "fc.0.*"),
                    Rule("attention.0.*", "pool.proj.*"),
                    Rule("attention.2.*", "pool.score.*"),
                    Rule("classifier.*", "head.*"),
                    Rule("layers.*", "layers.*"),
                    Rule("norm.*", "norm.*"),
                ),
                shapes={"attn_dim": ("pool.score.weight", 1)},
                infer=_infer_mamba,
                note="SRMamba and BiMamba have the same keys: bidirectional weights load as "
                "SRMamba (mixer='srmamba', rate 5); pass mixer='bimamba' or rate=... if "
                "trained so",
            ),
        ),
    ),
    Family(
        "aem",
        "dazhangyu123/AEM architecture/transformer.py",
        (
            Variant(
                "MHA base",
                ("q", "dimreduction.fc1.weight", "attention.q_proj.weight"),
                "aem-mha",
                (
                    Rule("dimreduction.fc1.*", "reduce.0.*"),
                    Rule("q", "pool.query"),
                    Rule("attention.layer_norm.*", "pool.norm.*"),
                    Rule("attention.*", "pool.*"),
                    Rule("classifier.fc.*", "head.*"),
                ),
                shapes={"inner_dim": ("reduce.0.weight", 0)},
                in_dim=("reduce.0.weight", 1),
            ),
            Variant(
                "ABMIL base (gated)",
                ("dimreduction.fc1.weight", "attention.attention_V.0.weight"),
                "aem-abmil",
                (
                    Rule("dimreduction.fc1.*", "reduce.0.*"),
                    Rule(
                        ("attention.attention_V.0.*", "attention.attention_U.0.*"),
                        "pool.proj.*",
                        "cat",
                    ),
                    Rule("attention.attention_weights.*", "pool.score.*"),
                    Rule("classifier.fc.*", "head.*"),
                ),
                shapes={"inner_dim": ("reduce.0.weight", 0)},
                in_dim=("reduce.0.weight", 1),
            ),
        ),
    ),
    Family(
        "dsmil",
        "binli123/dsmil-wsi dsmil.py, MILNet(FCLayer, BClassifier) as train_tcga.py saves it",
        (
            # Order matters: the first variant whose signature keys are all present wins.
            Variant(
                "BClassifier with the 'lin' layer (dsmil.py 2022-02-02 … 2022-09-18, "
                "--non_linearity 1)",
                ("b_classifier.lin.0.weight",),
                None,
                note="that BClassifier passes every feature through lin = Linear(D, D)→ReLU "
                "before q, v and the critical-instance query; milkit's dsmil has no such "
                "layer. Weights from dsmil.py since 2022-09-18 (dbb5cab) or before 2022-02-02 "
                "import",
            ),
            _dsmil_variant(
                "MILNet, nonlinear q, passing_v value network (dsmil.py since 2022-09-18)",
                "b_classifier.q.2.weight",
                True,
                {"nonlinear": True, "value_relu": True},
            ),
            _dsmil_variant(
                "MILNet, nonlinear q (dsmil.py since 2022-09-18, train_tcga.py default)",
                "b_classifier.q.2.weight",
                False,
                {"nonlinear": True},
            ),
            _dsmil_variant(
                "MILNet, linear q + value Linear (dsmil.py before 2022-09-18: CVPR 2021 code)",
                "b_classifier.q.weight",
                True,
                {"nonlinear": False, "value_relu": False},
                note="linear q with a value Linear: the layout of every dsmil.py before "
                "2022-09-18, whose value network has no ReLU (value_relu=False assumed). Since "
                "then (BClassifier(nonlinear=False, passing_v=True)) the same keys carry a "
                "ReLU: pass value_relu=True for weights trained with that code",
            ),
            _dsmil_variant(
                "MILNet, linear q (dsmil.py since 2022-09-18, --non_linearity 0)",
                "b_classifier.q.weight",
                False,
                {"nonlinear": False},
            ),
        ),
        aliases=("dsmil-wsi",),
    ),
)


# ------------------------------------------------------------------------------ machinery
def get_family(name: str) -> Family:
    """The family called ``name`` (or one of its aliases); unknown names list the others."""
    key = name.strip().lower().replace("_", "-")
    for fam in FAMILIES:
        if key == fam.name or key in fam.aliases:
            return fam
    known = ", ".join(f.name for f in FAMILIES)
    raise MilkitError("unknown official code family", value=name, hint=f"Known: {known}")


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\*", "(.*)") + "$")


def _match(pattern: str, key: str) -> str | None:
    """The text ``*`` stands for if ``key`` matches ``pattern``; "" for an exact match."""
    m = _compile(pattern).match(key)
    if m is None:
        return None
    return m.group(1) if m.groups() else ""


def _fill(pattern: str, rest: str) -> str:
    return pattern.replace("*", rest)


def read_state(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Tensor]:
    """The official state dict of ``source``: a state dict, or a ``.pt``/``.pth``/
    ``.safetensors`` file (torch files are read with ``weights_only=True``). Containers such as
    ``{"model": state}`` or ``{"state_dict": state}`` are unwrapped; so is a DataParallel
    ``module.`` prefix on every key."""
    path = None
    if isinstance(source, Mapping):
        payload: Any = source
    else:
        path = Path(source)
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise MilkitError("weights file not found", path=path)
            from safetensors.torch import load_file

            try:
                payload = load_file(str(path))
            except Exception as err:  # safetensors raises its own error types
                raise MilkitError("cannot read safetensors file", value=str(err)[:200],
                                  path=path) from None  # fmt: skip
        else:
            from milkit.io.checkpoint import safe_torch_load

            payload = safe_torch_load(path)
    if isinstance(payload, Mapping) and payload.get("format") in (
        "milkit-checkpoint",
        "milkit-train-state",
    ):
        raise MilkitError(
            "this is already a milkit checkpoint, not official-code weights",
            path=path,
            hint="Use it directly (load_checkpoint, teacher_init, predict)",
        )
    for key in ("model", "state_dict", "model_state_dict", "net"):
        inner = payload.get(key) if isinstance(payload, Mapping) else None
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, Tensor) for v in inner.values())
        ):
            payload = inner
            break
    if not isinstance(payload, Mapping) or not payload:
        raise MilkitError("no state dict found (expected a mapping of tensors)", path=path)
    state = {str(k): v for k, v in payload.items() if isinstance(v, Tensor)}
    others = sorted(str(k) for k, v in payload.items() if not isinstance(v, Tensor))
    if others:
        raise MilkitError(
            "the file holds entries that are not tensors", value=others[:10], path=path,
            hint="Pass the model's state_dict (a mapping of parameter names to tensors)",
        )  # fmt: skip
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # nn.DataParallel
    return state


def _unwrap_inner_dataparallel(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove a DataParallel ``.module`` under a top-level submodule (CLAM's ``relocate()`` wraps
    ``attention_net`` only: ``attention_net.module.0.weight``): for every top-level name all of
    whose keys continue with ``.module.``."""
    groups: dict[str, list[str]] = {}
    for key in state:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    wrapped = [
        top
        for top, keys in groups.items()
        if all(k.split(".")[1:2] == ["module"] and k.count(".") >= 2 for k in keys)
    ]
    out = {}
    for key, value in state.items():
        top = key.split(".", 1)[0]
        out[key.replace(f"{top}.module.", f"{top}.", 1) if top in wrapped else key] = value
    return out, wrapped


def match_variant(
    family: Family, state: Mapping[str, Tensor]
) -> tuple[Variant, dict[str, Tensor], list[str]]:
    """``detect_variant``, retried after removing inner DataParallel ``.module`` levels; returns
    (variant, the state it matched, notes)."""
    try:
        return detect_variant(family, state), dict(state), []
    except MilkitError:
        inner, wrapped = _unwrap_inner_dataparallel(state)
        if not wrapped:
            raise
        note = f"removed the DataParallel '.module' level under {', '.join(wrapped)}"
        return detect_variant(family, inner), inner, [note]


def detect_variant(family: Family, state: Mapping[str, Tensor]) -> Variant:
    """The first variant of ``family`` whose signature keys are all in ``state``."""

    def present(entry: str | tuple[str, ...]) -> bool:
        return any(k in state for k in ((entry,) if isinstance(entry, str) else entry))

    for variant in family.variants:
        if all(present(entry) for entry in variant.signature):
            return variant
    expected = "; ".join(
        f"{v.name}: {', '.join(e if isinstance(e, str) else ' or '.join(e) for e in v.signature)}"
        for v in family.variants
    )
    raise MilkitError(
        f"the weights do not look like any {family.name} checkpoint "
        f"(first keys: {', '.join(list(state)[:6])})",
        hint=f"Expected keys per variant — {expected}. Is --family right?",
    )


def convert_state(
    variant: Variant, state: Mapping[str, Tensor], ignore: Sequence[str] = ()
) -> tuple[dict[str, Tensor], list[str]]:
    """Apply ``variant.rules`` to ``state``: (milkit state, notes on dropped keys).

    Raises ``MilkitError`` listing every official key no rule maps (``ignore`` patterns are
    dropped on the caller's request and reported).
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    dropped: dict[str, list[str]] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key in used:
            continue
        if any(_match(p, key) is not None for p in ignore):
            dropped.setdefault("ignored on request", []).append(key)
            continue
        for rule in variant.rules:
            first = rule.src[0] if isinstance(rule.src, tuple) else rule.src
            rest = _match(first, key)
            if rest is None:
                continue
            if rule.dst is None:
                dropped.setdefault(rule.op, []).append(key)
            elif rule.op == "cat":
                assert isinstance(rule.src, tuple)
                parts = [_fill(p, rest) for p in rule.src]
                lacking = [p for p in parts if p not in state]
                if lacking:
                    raise MilkitError(
                        f"{key} needs its partner key(s) {lacking}, which the file lacks"
                    )
                out[_fill(rule.dst, rest)] = torch.cat([state[p] for p in parts], dim=0)
                used.update(parts)
            elif rule.op == "sigmoid_head":
                out[_fill(rule.dst, rest)] = torch.cat([torch.zeros_like(value), value], dim=0)
            else:
                out[_fill(rule.dst, rest)] = value
            used.add(key)
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise MilkitError(
            f"{len(unmapped)} official key(s) have no milkit counterpart for '{variant.name}': "
            f"{', '.join(unmapped[:20])}{' ...' if len(unmapped) > 20 else ''}",
            hint="Nothing was loaded. If they are truly unused at inference, pass "
            "ignore=[pattern, ...] (CLI: --ignore PATTERN)",
        )
    notes = [f"dropped {len(v)} key(s) ({why}): {', '.join(v[:6])}" for why, v in dropped.items()]
    return out, notes


def _shape_arg(
    state: Mapping[str, Tensor],
    spec: ShapeSpec,
    what: str,
    kwargs: Mapping[str, Any] | None = None,
) -> int:
    if callable(spec):
        return int(spec(state, kwargs or {}))
    key, dim = spec
    if key not in state:
        raise MilkitError(f"cannot infer {what}: the converted weights lack {key}")
    return int(state[key].shape[dim])


def load_official(
    source: str | os.PathLike[str] | Mapping[str, Any],
    family: str,
    *,
    ignore: Sequence[str] = (),
    **overrides: Any,
) -> OfficialImport:
    """Load weights trained with a paper's official code into the matching milkit model.

    Args:
        source: a state dict, or a ``.pt``/``.pth`` (read with ``weights_only=True``) or
            ``.safetensors`` file holding one (``{"model": ...}``/``{"state_dict": ...}``
            containers and DataParallel ``module.`` prefixes are unwrapped).
        family: the official code: ``clam``, ``ilse`` (AttentionDeepMIL), ``transmil``,
            ``mhim`` (MHIM-MIL v1/v2, incl. its shipped init checkpoints), ``rrt`` (R²T-MIL),
            ``mambamil``, ``aem``, ``dsmil`` (binli123/dsmil-wsi).
        ignore: official key patterns (``*`` = rest of the key) to drop on purpose.
        **overrides: milkit constructor arguments that the file cannot tell (e.g.
            ``legacy_nystrom=True``, ``mixer="bimamba"``, ``region_num=16``); they also override
            inferred ones.

    Returns:
        ``OfficialImport`` with the model in eval mode and ``notes`` (what was detected,
        dropped or assumed).

    Raises:
        MilkitError: unknown family; weights of no known variant; official keys without a
            counterpart, milkit parameters left unfilled or shapes that differ (all listed) —
            a partial load never happens.
    """
    from milkit import models

    fam = get_family(family)
    variant, state, unwrapped = match_variant(fam, read_state(source))
    where = source if not isinstance(source, Mapping) else None
    if variant.model is None:
        raise MilkitError(f"{fam.name}: '{variant.name}' cannot be imported", path=where,
                          hint=variant.note)  # fmt: skip
    layout_kwargs: dict[str, Any] = {}
    if fam.normalise is not None:
        state, layout_notes, layout_kwargs = fam.normalise(state)
        unwrapped = unwrapped + layout_notes
    converted, notes = convert_state(variant, state, ignore)
    notes = unwrapped + notes
    kwargs: dict[str, Any] = {**variant.overrides, **layout_kwargs}
    for arg, spec in variant.shapes.items():
        kwargs[arg] = _shape_arg(converted, spec, arg)
    if variant.infer is not None:
        kwargs.update(variant.infer(converted))
    kwargs.update(overrides)
    in_dim = _shape_arg(converted, variant.in_dim, "in_dim", kwargs)
    num_classes = _shape_arg(converted, variant.num_classes, "num_classes", kwargs)
    try:
        model = models.create(variant.model, in_dim, num_classes, **kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise MilkitError(f"cannot build {variant.model} for these weights", value=str(err),
                          path=where) from None  # fmt: skip
    _load_strict(model, converted, f"{fam.name} '{variant.name}' → {variant.model}", where)
    model.eval()
    said = [f"detected {fam.name}: {variant.name} → milkit {variant.model}"]
    if variant.note:
        said.append(variant.note)
    return OfficialImport(
        model=model,
        model_name=variant.model,
        model_kwargs=kwargs,
        in_dim=in_dim,
        num_classes=num_classes,
        family=fam.name,
        variant=variant.name,
        notes=said + notes,
        state=converted,
    )


def _load_strict(
    model: nn.Module, state: Mapping[str, Tensor], what: str, where: Any = None
) -> None:
    """``load_state_dict(strict=True)`` with every missing, unexpected or misshapen key listed."""
    from milkit.io.checkpoint import state_dict_mismatch

    own = model.state_dict()
    missing, unexpected, misshapen = (sorted(keys) for keys in state_dict_mismatch(own, state))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshapen]
    problems = []
    if missing:
        problems.append(f"milkit parameters not in the file: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"converted keys the model lacks: {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"shapes differ (file vs model): {'; '.join(shapes[:10])}")
    if problems:
        raise MilkitError(
            f"weights do not fit ({what}): " + " | ".join(problems),
            path=where,
            hint="Nothing was loaded. Pass the constructor options the run used as overrides",
        )
    model.load_state_dict(state, strict=True)
