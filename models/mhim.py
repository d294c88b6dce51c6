"""MHIM-MIL: masked hard instance mining with an EMA teacher (Tang et al., ICCV 2023 / IJCV 2025)."""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from milkit.errors import ModelError
from milkit.models.abmil import ABMIL
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.layers.grn import GlobalRecycleNetwork
from milkit.models.layers.mhim_masking import cosine_value, mhim_mask, random_subset
from milkit.models.registry import register_aggregator
from milkit.models.transmil import TransMIL

_DOC = """
    Paper: Tang et al., "Multiple Instance Learning Framework with Masked Hard Instance Mining for
    Whole Slide Image Classification", ICCV 2023 (v1); "... for Gigapixel Histopathology Image
    Analysis", IJCV 2025, arXiv 2509.11526 (v2). Code: github.com/DearCaat/MHIM-MIL (branch
    ``v1`` = ICCV, ``master`` = v2).

    A student S and an identical teacher T (EMA of S, no gradient, kept in train() mode — dropout
    on — as in the official code). One training forward (``self.training``), per bag::

        F_t, s = T(X)                                   teacher bag feature and instance scores
        R = mask(s)                                     instances removed (hard ones, see below)
        F_s, logits = S(X \\ R)                           student on the kept instances
        L = CE(logits, y) + α · L_con,   L_con = −Σ_d softmax(F_t/τ_t)_d · log softmax(F_s/τ_s)_d

    on the 512-d bag features (τ_t = 0.1, τ_s = 1). ``α·L_con`` is returned in ``aux_losses``
    (``mhim_cl``). After each optimiser step ``on_train_step_end`` does
    ``θ_T ← m θ_T + (1 − m) θ_S`` over all parameters and advances the schedules. Evaluation =
    student only, all instances, no masking.

    v1 masking (scores = teacher softmax attention; TransMIL: per-head cls attention of the
    FIRST layer, fused by multi-head vote): random ⌈β_r N⌉ (``mask_ratio``), the ⌈β_l N⌉ lowest
    (``mask_ratio_l``), and the high-attention mask: top ⌈(β_h/ρ) N⌉ of which a random ⌈ρ·that⌉
    (``mask_ratio_h`` β_h, ``mask_ratio_hr`` ρ); the union is removed. ``mrh_sche``: β_h follows a
    cosine from β_h to 0 over all training steps; ``mm_sche``: m follows a cosine from m to
    ``mm_final`` (1.0). Kept instances stay in their original order (official: set difference).

    v2 (``version="v2"``): scores = class-aware instance probability (``attn2score``:
    ``max_c softmax_c(W_c (a_i h_i) + b_0)``), high masking only (random/low masks are v1-only and
    ignored), then the Global Recycle Network: a random ``merge_ratio`` of the remaining instances
    is kept, the rest are recycled into ``merge_k`` global tokens (EMA queries, ``merge_mm``) that
    are appended to the student's input (training only). ``version`` switches mechanisms only;
    the other hyper-parameters keep the defaults below unless overridden (v2's own options.py
    defaults differ: ρ 1.0, m 0.9997, see below).

    Official commands (README v1), α / β_h / ρ / β_r / β_l / mrh_sche / mm_sche:

    ===================== ===== ===== ===== ===== ===== ======== =======
    setting               α     β_h   ρ     β_r   β_l   mrh_sche mm_sche
    ===================== ===== ===== ===== ===== ===== ======== =======
    ABMIL C16 (R-HAM)     0.1   0.01  0.5   0.5   0     on       off
    ABMIL TCGA (LR-HAM)   0.5   0.02  1     0.7   0.2   on       on
    TransMIL C16 (L-HAM)  0.1   0.03  0.5   0     0.8   on       on
    TransMIL TCGA         0.5   0.02  1     0.6   0.2   on       off
    ===================== ===== ===== ===== ===== ===== ======== =======

    v2 README: ``--attn2score --merge_enable --merge_mm=0.9999 --aux_alpha=0.5``, β_h ∈ {0.01,
    0.03, 0.05}, merge_ratio ∈ {0.8, 0.9}, merge_k ∈ {1, 5, 10}; options.py: merge_k 1,
    merge_ratio 0.2, merge_mm 0.9998, mm 0.9997.

    Teacher init: ``teacher_init=PATH`` loads a checkpoint of the base model trained on the same
    fold and seed: a milkit checkpoint of the base model, a bare state-dict under milkit names, or
    an official MHIM-MIL file (e.g. the shipped ``modules/init_ckp/*/fold_k_model_best_auc.pt``;
    its keys are renamed by ``milkit.models.official``, family ``mhim``). Loading is strict: a
    GATED checkpoint (MHIM's TCGA ABMIL init files) into a non-gated base is refused with a
    message naming it (the official v1 code loads it with ``strict=False`` and silently keeps a
    random teacher attention); build the model with ``gated=True`` for those. ``init_stu_type``
    ``"fc"`` (official default) also copies its instance-embedding Linear into the student,
    ``"all"`` copies everything, ``"none"`` nothing. Without it the teacher starts as a copy of
    the student (paper Table 5: "student-copy" init).

    Departures: masking is vectorised per bag (top-k / randperm as boolean masks; vote ties broken
    by the head-mean score); B > 1 works through masks; if a bag would lose all instances its
    lowest-scored removed one is kept; ``training_preset``: Adam lr 2e-4, wd 1e-5, cosine LR over
    200 epochs stepped per epoch (``scheduler="cosine-epoch"``, as the official
    ``CosineAnnealingLR``), batch 1 (official early stopping on the TEST fold is not
    reproduced).
"""


class _MHIM(MILModel):
    """Shared MHIM-MIL machinery; subclasses build the student base model."""

    training_preset: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",  # v1 main.py --opt adam
        "lr": 2e-4,  # --lr 2e-4
        "weight_decay": 1e-5,  # --weight_decay 1e-5
        "epochs": 200,  # --num_epoch 200
        # --lr_sche cosine: CosineAnnealingLR(T_max=num_epoch) stepped once per EPOCH
        # (main.py train_loop; --lr_supi, per-iteration, is off in every README command)
        "scheduler": "cosine-epoch",
        "batch_size": 1,
    }
    base_name: ClassVar[str] = ""
    model_name: ClassVar[str] = "mhim"

    def _setup(
        self,
        student: ABMIL | TransMIL,
        *,
        version: str,
        cl_alpha: float,
        mask_ratio_h: float,
        mask_ratio_hr: float,
        mask_ratio: float,
        mask_ratio_l: float,
        mrh_sche: bool,
        mm_sche: bool,
        mm: float,
        mm_final: float,
        temp_t: float,
        temp_s: float,
        merge_k: int,
        merge_ratio: float,
        merge_mm: float,
        teacher_init: str | os.PathLike[str] | None,
        init_stu_type: str,
    ) -> None:
        if version not in ("v1", "v2"):
            raise ModelError(self.model_name, "version must be 'v1' or 'v2'", value=version)
        if init_stu_type not in ("fc", "all", "none"):
            raise ModelError(
                self.model_name, "init_stu_type must be 'fc', 'all' or 'none'", value=init_stu_type
            )
        if not 0 < mask_ratio_hr <= 1:
            raise ModelError(
                self.model_name, "mask_ratio_hr (ρ) must be in (0, 1]", value=mask_ratio_hr
            )
        for name, value in (("mask_ratio_h", mask_ratio_h), ("mask_ratio", mask_ratio)):
            if not 0 <= value <= 1:
                raise ModelError(self.model_name, f"{name} must be in [0, 1]", value=value)
        if not 0 <= mask_ratio_l <= 1:
            raise ModelError(self.model_name, "mask_ratio_l must be in [0, 1]", value=mask_ratio_l)
        if not 0 <= merge_ratio < 1:
            raise ModelError(self.model_name, "merge_ratio must be in [0, 1)", value=merge_ratio)
        self.version = version
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.in_dim, self.num_classes = student.in_dim, student.num_classes
        self.embed_dim = student.embed_dim
        self.cl_alpha, self.temp_t, self.temp_s = cl_alpha, temp_t, temp_s
        self.mask_ratio_h, self.mask_ratio_hr = mask_ratio_h, mask_ratio_hr
        self.mask_ratio, self.mask_ratio_l = mask_ratio, mask_ratio_l
        self.mrh_sche, self.mm_sche = mrh_sche, mm_sche
        self.mm, self.mm_final = mm, mm_final
        # Current β_h (scheduled); a buffer so that a resumed run continues the schedule.
        self.register_buffer(
            "current_mask_ratio_h", torch.tensor(float(mask_ratio_h), dtype=torch.float64)
        )  # float64: ⌈β_h N⌉ must see the exact ratio (0.1 in float32 is 0.10000000149)
        self.grn: GlobalRecycleNetwork | None = None
        self.merge_ratio = merge_ratio
        if version == "v2":
            self.grn = GlobalRecycleNetwork(
                student.embed_dim, num_queries=merge_k, momentum=merge_mm
            )
        if teacher_init is not None:
            self.load_teacher(teacher_init, init_stu_type=init_stu_type)

    # ------------------------------------------------------------------ teacher and student
    def load_teacher(self, path: str | os.PathLike[str], *, init_stu_type: str = "fc") -> None:
        """Initialise the teacher from a checkpoint of the base model (see class docstring)."""
        from milkit.errors import MilkitError
        from milkit.io.checkpoint import read_checkpoint
        from milkit.models.registry import normalise_name

        state, meta = read_checkpoint(path)
        trained = normalise_name(str(meta.get("model_name") or ""))
        if trained and trained not in (self.base_name, self.model_name):
            # Same parameter names do not make the same function (e.g. TransMIL's szc layout vs
            # MHIM's SAttention base): refuse rather than load a teacher of another model.
            raise MilkitError(
                f"teacher_init checkpoint was trained as {trained!r}, but the base of "
                f"{self.model_name} is {self.base_name!r}",
                path=path,
                hint=f"Train `milkit train --model {self.base_name} ...` on the same fold/seed",
            )
        if any(k.startswith("student.") for k in state):
            state = {k[8:]: v for k, v in state.items() if k.startswith("student.")}
        state = self._from_official(state, path)
        try:
            self.teacher.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise MilkitError(
                f"teacher_init checkpoint does not match the {self.base_name} base of "
                f"{type(self).__name__}",
                value=str(err).splitlines()[0][:200],
                path=path,
                hint=(
                    f"Train the base model with the same settings first (e.g. `milkit train "
                    f"--model {self.base_name} ...`) and pass its best.pt"
                ),
            ) from None
        if init_stu_type == "all":
            self.student.load_state_dict(self.teacher.state_dict())
        elif init_stu_type == "fc":
            self.student.fc.load_state_dict(self.teacher.fc.state_dict())

    def _from_official(self, state: dict[str, Tensor], path: Any) -> dict[str, Tensor]:
        """Rename an official MHIM-MIL state dict (``predictor.*`` keys) to milkit names;
        refuse, naming it, a gated file for a non-gated base and vice versa."""
        from milkit.errors import MilkitError
        from milkit.models.official import convert_state, detect_variant, get_family

        if "predictor.weight" not in state:
            return state
        variant = detect_variant(get_family("mhim"), state)
        gated_file = bool(variant.overrides.get("gated", False))
        gated_model = bool(getattr(getattr(self.teacher, "pool", None), "gated", False))
        if (
            variant.model is not None
            and variant.model.startswith("abmil")
            and (gated_file != gated_model)
        ):
            kind = "GATED (attention_a/b/c)" if gated_file else "non-gated"
            raise MilkitError(
                f"teacher_init checkpoint has a {kind} attention but {self.model_name} was "
                f"built {'non-' if not gated_model else ''}gated",
                path=path,
                hint=(
                    f"Build {self.model_name} with gated={gated_file}. (MHIM-MIL v1 loads such "
                    "a file with strict=False, which silently leaves the teacher attention "
                    "random.)"
                ),
            )
        converted, _ = convert_state(variant, state)
        return converted

    def reset_classifier(self, num_classes: int) -> None:
        self.student.reset_classifier(num_classes)
        self.teacher.reset_classifier(num_classes)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.num_classes = num_classes

    @torch.no_grad()
    def _teacher_pass(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Teacher bag feature (B, E) and instance scores ((B, N) or (B, H, N))."""
        h = self.teacher.embed_instances(x)
        out = self._teacher_forward(h, mask)
        if self.version == "v2" or out.attention is None:
            return out.embedding, self._class_aware(h, out, mask)
        return out.embedding, out.attention

    def _teacher_forward(self, h: Tensor, mask: Tensor | None) -> MILOutput:
        raise NotImplementedError

    def _class_aware(self, h: Tensor, out: MILOutput, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        if not self.training:
            return self.student(x, mask)
        valid = (
            mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        )
        feat_t, scores = self._teacher_pass(x, mask)
        beta_h = float(self.current_mask_ratio_h)
        if self.version == "v1":
            removed = mhim_mask(
                scores,
                valid,
                ratio_h=beta_h,
                ratio_hr=self.mask_ratio_hr,
                ratio_r=self.mask_ratio,
                ratio_l=self.mask_ratio_l,
            )
        else:
            removed = mhim_mask(scores, valid, ratio_h=beta_h, ratio_hr=self.mask_ratio_hr)
        keep = valid & ~removed
        h = self.student.embed_instances(x)
        n = x.shape[1]
        if self.grn is not None:
            h, keep = self._recycle(h, keep)
        out = self.student.forward_embedded(h, keep)
        attention = out.attention[..., :n] if out.attention is not None else None
        logits_att = out.attention_logits[..., :n] if out.attention_logits is not None else None
        if attention is not None and self.grn is not None:
            attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-12)
        loss_cl = -(
            F.softmax(feat_t / self.temp_t, dim=-1) * F.log_softmax(out.embedding / self.temp_s, -1)
        ).sum(-1)
        return MILOutput(
            logits=out.logits,
            embedding=out.embedding,
            attention=attention,
            attention_logits=logits_att,
            aux_losses={"mhim_cl": self.cl_alpha * loss_cl.mean()},
        )

    def _recycle(self, h: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """GRN: keep a random ⌊merge_ratio · L⌋ of the L remaining instances per bag, recycle the
        others into global tokens appended at the end (merge.py ``int(L * merge_ratio)``)."""
        grn = self.grn
        if grn is None:  # pragma: no cover - only called with a GRN
            return h, keep
        n_left = keep.sum(dim=1)
        k = torch.floor(n_left.to(torch.float64) * self.merge_ratio).to(torch.int64)
        kept = random_subset(keep, k)
        recycled = keep & ~kept
        g = grn(h, recycled)
        grn.update(g)
        new_mask = torch.cat([kept, kept.new_ones(g.shape[:2])], dim=1)
        return torch.cat([h, g], dim=1), new_mask

    # ------------------------------------------------------------------------------ hooks
    @torch.no_grad()
    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """EMA update with the momentum of the step just done (0-based ``step − 1``), then β_h
        for the next step. ``step`` counts finished optimiser steps (1 after the first)."""
        m = self.momentum_at(step - 1, total_steps)
        for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            p_t.mul_(m).add_(p_s.detach(), alpha=1.0 - m)
        for b_t, b_s in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            b_t.copy_(b_s)
        self.current_mask_ratio_h.fill_(self.mask_ratio_h_at(step, total_steps))

    def momentum_at(self, step: int, total_steps: int) -> float:
        """EMA momentum at 0-based step ``step`` (cosine m → mm_final when ``mm_sche``)."""
        return cosine_value(self.mm, self.mm_final, step, total_steps) if self.mm_sche else self.mm

    def mask_ratio_h_at(self, step: int, total_steps: int) -> float:
        """β_h at 0-based step ``step`` (cosine β_h → 0 when ``mrh_sche``)."""
        if not self.mrh_sche:
            return self.mask_ratio_h
        return cosine_value(self.mask_ratio_h, 0.0, step, total_steps)


@register_aggregator(
    "mhim-abmil",
    description="MHIM-MIL (Tang 2023/2025) with an ABMIL student and EMA teacher",
)
class MHIMABMIL(_MHIM):
    __doc__ = (
        "MHIM-MIL with DearCaat's ABMIL (DAttention) as student and teacher.\n"
        + _DOC
        + """
    Defaults = the official v1 ABMIL C16 command. Base: Linear(D→512)+ReLU, Dropout 0.25,
    DAttention (Linear 512→128 no bias, ReLU, Linear 128→1 no bias), Linear(512→C), Xavier-normal
    init (= the ``abmil-dattention`` model, whose checkpoints are valid ``teacher_init`` files).
    ``gated=True``: the gated DAttention (``AttentionGated``: ``act(V h) ⊙ sigmoid(U h)``, act =
    ``da_act``) of MHIM's TCGA ABMIL init checkpoints.
    """
    )

    permutation_invariant: ClassVar[bool] = True
    base_name: ClassVar[str] = "abmil-dattention"
    model_name: ClassVar[str] = "mhim-abmil"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        version: str = "v1",
        cl_alpha: float = 0.1,  # README v1 ABMIL C16: --cl_alpha=0.1
        mask_ratio_h: float = 0.01,  # --mask_ratio_h=0.01
        mask_ratio_hr: float = 0.5,  # --mask_ratio_hr=0.5
        mask_ratio: float = 0.5,  # --mask_ratio=0.5 (random)
        mask_ratio_l: float = 0.0,  # --mask_ratio_l=0.
        mrh_sche: bool = True,  # --mrh_sche
        mm_sche: bool = False,  # (not passed)
        mm: float = 0.9999,  # options default --mm 0.9999
        mm_final: float = 1.0,  # --mm_final 1.0
        temp_t: float = 0.1,  # --temp_t 0.1
        temp_s: float = 1.0,  # --temp_s 1.0
        merge_k: int = 1,  # v2 options.py --merge_k 1
        merge_ratio: float = 0.2,  # v2 options.py --merge_ratio 0.2
        merge_mm: float = 0.9998,  # v2 options.py --merge_mm 0.9998
        dim: int = 512,  # mlp_dim 512
        attn_dim: int = 128,  # DAttention D = 128
        dropout: float = 0.25,  # --dropout 0.25
        act: str = "relu",  # --act relu
        da_act: str = "relu",  # --da_act relu
        gated: bool = False,  # MHIM's TCGA ABMIL init checkpoints are gated
        teacher_init: str | os.PathLike[str] | None = None,
        init_stu_type: str = "fc",  # --init_stu_type fc
    ) -> None:
        super().__init__()
        student = ABMIL(
            in_dim,
            num_classes,
            fc_dim=dim,
            attn_dim=attn_dim,
            gated=gated,
            fc_dropout=dropout,
            attn_dropout=0.0,
            act=act,
            attn_act=da_act,
            attn_bias=False,
            init="xavier",
        )
        self._setup(
            student,
            version=version,
            cl_alpha=cl_alpha,
            mask_ratio_h=mask_ratio_h,
            mask_ratio_hr=mask_ratio_hr,
            mask_ratio=mask_ratio,
            mask_ratio_l=mask_ratio_l,
            mrh_sche=mrh_sche,
            mm_sche=mm_sche,
            mm=mm,
            mm_final=mm_final,
            temp_t=temp_t,
            temp_s=temp_s,
            merge_k=merge_k,
            merge_ratio=merge_ratio,
            merge_mm=merge_mm,
            teacher_init=teacher_init,
            init_stu_type=init_stu_type,
        )

    def _teacher_forward(self, h: Tensor, mask: Tensor | None) -> MILOutput:
        return self.teacher.forward_embedded(h, mask)

    def _class_aware(self, h: Tensor, out: MILOutput, mask: Tensor | None) -> Tensor:
        """``max_c softmax_c(W_c (a_i h_i) + b_0)`` (v2 ``get_pseudo_score``), 0 at padding."""
        head, attention = self.teacher.head, out.attention
        if attention is None:  # pragma: no cover - ABMIL always returns attention
            raise ModelError(self.model_name, "the teacher returned no attention")
        logits = (attention[..., None] * h) @ head.weight.T + head.bias[0]
        scores = logits.softmax(dim=-1).amax(dim=-1)
        return scores if mask is None else scores * mask


@register_aggregator(
    "mhim-transmil",
    description="MHIM-MIL (Tang 2023/2025) with a TransMIL student and EMA teacher",
)
class MHIMTransMIL(_MHIM):
    __doc__ = (
        "MHIM-MIL with TransMIL as student and teacher.\n"
        + _DOC
        + """
    Defaults = the official v1 TransMIL C16 command (L-HAM). Base: MHIM-MIL's ``selfattn`` base
    = ``transmil-sattention`` (SAttention: the sequence is ``[cls; N instances]`` without
    TransMIL's square-padding copies, PPEG pads/crops internally on a ≥ 7 × 7 grid; Dropout 0.25
    after the input Linear, Xavier-normal init); teacher scores = the first layer's per-head cls
    attention over the N instances, fused by vote (v1), or v2's class-aware scores computed from
    that layer's cls row and values. Checkpoints of ``transmil-sattention`` (and MHIM-MIL's own
    TransMIL init files, converted) are valid ``teacher_init`` files.
    """
    )

    permutation_invariant: ClassVar[bool] = False
    base_name: ClassVar[str] = "transmil-sattention"
    model_name: ClassVar[str] = "mhim-transmil"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        version: str = "v1",
        cl_alpha: float = 0.1,  # README v1 TransMIL C16: --cl_alpha=0.1
        mask_ratio_h: float = 0.03,  # --mask_ratio_h=0.03
        mask_ratio_hr: float = 0.5,  # --mask_ratio_hr=0.5
        mask_ratio: float = 0.0,  # --mask_ratio=0.
        mask_ratio_l: float = 0.8,  # --mask_ratio_l=0.8
        mrh_sche: bool = True,  # --mrh_sche
        mm_sche: bool = True,  # --mm_sche
        mm: float = 0.9999,  # options default --mm 0.9999
        mm_final: float = 1.0,  # --mm_final 1.0
        temp_t: float = 0.1,  # --temp_t 0.1
        temp_s: float = 1.0,  # --temp_s 1.0
        merge_k: int = 1,  # v2 options.py --merge_k 1
        merge_ratio: float = 0.2,  # v2 options.py --merge_ratio 0.2
        merge_mm: float = 0.9998,  # v2 options.py --merge_mm 0.9998
        dim: int = 512,  # mlp_dim 512
        heads: int = 8,  # SAttention head 8
        num_landmarks: int = 256,  # dim // 2
        dropout: float = 0.25,  # --dropout 0.25 (after the input Linear)
        teacher_init: str | os.PathLike[str] | None = None,
        init_stu_type: str = "fc",  # --init_stu_type fc
    ) -> None:
        super().__init__()
        student = TransMIL(
            in_dim,
            num_classes,
            dim=dim,
            heads=heads,
            num_landmarks=num_landmarks,
            fc_dropout=dropout,
            init="xavier",
            layout="sattention",  # MHIM-MIL SAttention (satten.py + emb_position.py PPEG)
        )
        self._setup(
            student,
            version=version,
            cl_alpha=cl_alpha,
            mask_ratio_h=mask_ratio_h,
            mask_ratio_hr=mask_ratio_hr,
            mask_ratio=mask_ratio,
            mask_ratio_l=mask_ratio_l,
            mrh_sche=mrh_sche,
            mm_sche=mm_sche,
            mm=mm,
            mm_final=mm_final,
            temp_t=temp_t,
            temp_s=temp_s,
            merge_k=merge_k,
            merge_ratio=merge_ratio,
            merge_mm=merge_mm,
            teacher_init=teacher_init,
            init_stu_type=init_stu_type,
        )

    def _teacher_forward(self, h: Tensor, mask: Tensor | None) -> MILOutput:
        return self.teacher.forward_embedded(h, mask, attn_layer=0)  # v1 --attn_layer 0

    def _class_aware(self, h: Tensor, out: MILOutput, mask: Tensor | None) -> Tensor:
        return self.teacher.class_aware_scores(h, mask)
