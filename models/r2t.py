"""R²T-MIL: re-embedding the tile features with regional transformers, then ABMIL pooling."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.layers.attention_pool import AttentionPool
from milkit.models.layers.ragged import apply_per_bag
from milkit.models.layers.region_attention import CrossRegionAttention, RegionAttention
from milkit.models.registry import register_aggregator

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class _PreNormResidual(nn.Module):
    """``x + attn(LN(x))`` (official ``TransLayer`` without FFN, drop_path 0)."""

    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


class R2TEncoder(nn.Module):
    """R²T re-embedding encoder (official ``RRTEncoder``); usable in front of any aggregator.

    Paper: Tang et al., "Feature Re-Embedding: Towards Foundation Model-Level Performance in
    Computational Pathology", CVPR 2024; code github.com/DearCaat/RRT-MIL ``modules/rrt.py``.

    Equations (see ``models.layers.region_attention`` for R-MSA/EPEG and CR-MSA)::

        x ← x + R-MSA(LN(x))          (n_layers − 1 times; 1 with the official n_layers = 2)
        x ← x + CR-MSA(LN(x))
        x ← x + x_in                  (only with all_shortcut)
        x ← LN(x)

    Bags are processed independently: with a mask each bag is re-embedded at its own length
    (its own region grid), so padded batches give exactly the per-bag result. (The official code
    stacks the regions of all bags of a batch and lets CR-MSA attend across bags.)

    Args:
        dim: token width (``mlp_dim`` 512).
        n_layers: R-MSA layers + 1 (2 official).
        n_heads: R-MSA heads (8 official; head_dim = dim / heads = 64).
        region_num: regions per side R of the R-MSA layers (8 official) or ``"auto"`` for long
            bags (see ``region_grid``; the README advises R ≥ 16 for long survival bags).
        crmsa_region_num: regions per side of CR-MSA. Default 8, as the official code: its
            ``RRTEncoder`` builds CR-MSA without passing ``region_num``, so CR-MSA keeps its own
            default of 8 whatever ``region_num`` is. ``"same"``: use ``region_num`` for CR-MSA
            too (milkit's behaviour up to commit ab7cc23; not the official model).
        epeg_k: EPEG kernel (15 official default); 0 disables EPEG.
        crmsa_k: representatives per region (3 official default).
        crmsa_heads: CR-MSA heads (8 official).
        crmsa_mlp: MLP Φ instead of a matrix.
        all_shortcut: extra residual from the encoder input.
        drop: projection dropout of both attentions (``trans_dropout`` 0.1 official).
        qkv_bias: qkv bias (True official).
    """

    def __init__(
        self,
        dim: int = 512,
        *,
        n_layers: int = 2,
        n_heads: int = 8,
        region_num: int | str = 8,
        epeg_k: int = 15,
        crmsa_k: int = 3,
        crmsa_heads: int = 8,
        crmsa_mlp: bool = False,
        all_shortcut: bool = False,
        drop: float = 0.1,
        qkv_bias: bool = True,
        crmsa_region_num: int | str = 8,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ModelError("r2t-abmil", "n_layers must be >= 1", value=n_layers)
        if region_num != "auto" and (not isinstance(region_num, int) or region_num < 1):
            raise ModelError("r2t-abmil", "region_num must be >= 1 or 'auto'", value=region_num)
        if crmsa_region_num == "same":
            crmsa_region_num = region_num
        if crmsa_region_num != "auto" and (
            not isinstance(crmsa_region_num, int) or crmsa_region_num < 1
        ):
            raise ModelError(
                "r2t-abmil",
                "crmsa_region_num must be >= 1, 'auto' or 'same'",
                value=crmsa_region_num,
            )
        self.crmsa_region_num = crmsa_region_num
        self.dim, self.all_shortcut = dim, all_shortcut
        self.layers = nn.Sequential(
            *(
                _PreNormResidual(
                    dim,
                    RegionAttention(
                        dim,
                        n_heads,
                        region_num=region_num,
                        epeg_k=epeg_k,
                        qkv_bias=qkv_bias,
                        proj_drop=drop,
                    ),
                )
                for _ in range(n_layers - 1)
            )
        )
        self.cr_msa = _PreNormResidual(
            dim,
            CrossRegionAttention(
                dim,
                crmsa_heads,
                region_num=crmsa_region_num,  # official: always 8 (see Args)
                crmsa_k=crmsa_k,
                crmsa_mlp=crmsa_mlp,
                qkv_bias=qkv_bias,
                proj_drop=drop,
            ),
        )
        self.norm = nn.LayerNorm(dim)

    def encode(self, x: Tensor) -> Tensor:
        """Re-embed unpadded bags of one common length: (b, n, dim) -> (b, n, dim)."""
        h = self.cr_msa(self.layers(x))
        if self.all_shortcut:
            h = h + x
        return self.norm(h)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, dim) with optional (B, N) bool mask -> (B, N, dim), 0 at padding."""
        return apply_per_bag(self.encode, x, mask)


@register_aggregator("r2t-abmil", description="R2T-MIL: R2T encoder + ABMIL (CVPR 2024)")
class R2TMIL(MILModel):
    """R²T-MIL (Tang, Zhou, Zhang, Liu, Li, Ding, Zhao, Xiong, Zou, "Feature Re-Embedding:
    Towards Foundation Model-Level Performance in Computational Pathology", CVPR 2024; official
    code github.com/DearCaat/RRT-MIL, ``modules/rrt.py`` ``RRTMIL``).

    Equations::

        h = Dropout_0.25(ReLU(W_in x))                      (N, 512)
        H = R2TEncoder(h)                                   R-MSA (+EPEG), CR-MSA (8×8), LN
        e_i = w^T act(V H_i)  (no biases);  a = softmax(e);  z = Σ a_i H_i     (DAttention)
        logits = W_cls z

    ``act`` = ``da_act``: tanh, as every README command passes ``--da_act=tanh`` (main.py's
    argparse default is relu; ``da_act="relu"`` reproduces runs without the flag).

    Instances are used in file (raster) order: the model is order-sensitive. Init: Xavier-normal
    for every Linear and the EPEG Conv2d, zero biases, LN = (1, 0) (official
    ``initialize_weights``); Φ keeps its Kaiming-uniform init.

    Official per-dataset settings (README / ``rrt.py __main__``; R50 = ResNet-50 1024-d,
    PLIP 512-d features):

    ============  =======  =======  ===========  ============  =========
    dataset       epeg_k   crmsa_k  crmsa_heads  all_shortcut  crmsa_mlp
    ============  =======  =======  ===========  ============  =========
    C16-R50       15       1        8            yes           no
    C16-PLIP      9        3        8            yes           no
    NSCLC-R50     21       5        8            no            no
    NSCLC-PLIP    13       3        1            yes           yes
    BRCA-R50      17       3        1            no            no
    BRCA-PLIP     15       1        8            yes           no
    ============  =======  =======  ===========  ============  =========

    Survival: grid crmsa_k ∈ {1, 3, 5}, epeg_k ∈ {9, 15, 21}; region_num ≥ 16 for long bags
    (R-MSA only: CR-MSA keeps 8 × 8 regions in the official code, see ``R2TEncoder``).
    Training (``training_preset``): Adam, lr 2e-4, weight decay 1e-5, cosine LR over 200 epochs
    stepped once per EPOCH (``CosineAnnealingLR(T_max=num_epoch)``; ``--lr_supi`` is off in the
    README commands), cross-entropy, batch 1, no early stopping (``--early_stopping`` is off in
    every README command; the official loop keeps the best-AUC epoch, milkit monitors val_auc).

    dtype: the forward runs in the input's dtype (float64 for exact checks).

    Departures: padded batches run each bag on its own region grid (official B > 1 mixes bags);
    EPEG is computed exactly through modified queries and fused attention (see
    ``models.layers.region_attention``); ``region_num="auto"`` is an addition for 10⁵-tile bags.

    Args:
        dim: embedding width (512 official).
        act: input activation (``"relu"`` official).
        dropout: dropout after the input projection (0.25 official).
        attn_dim: DAttention hidden size (128 official).
        da_act: DAttention activation, ``"tanh"`` (README commands, default), ``"relu"``
            (argparse default) or ``"gelu"``.
        trans_dropout: encoder projection dropout (0.1 official).
        crmsa_region_num: CR-MSA regions per side (8 official; ``"same"``: = region_num).
        n_layers, n_heads, region_num, epeg_k, crmsa_k, crmsa_heads, crmsa_mlp, all_shortcut:
            see ``R2TEncoder`` (official defaults 2, 8, 8, 15, 3, 8, False, False).
    """

    model_name = "r2t-abmil"

    permutation_invariant = False
    mil_respecting = False
    supports_padding = True
    training_preset: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "epochs": 200,
        "scheduler": "cosine-epoch",  # main.py: CosineAnnealingLR(T_max=num_epoch), per epoch
        "batch_size": 1,
    }

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        dim: int = 512,
        act: str = "relu",
        dropout: float = 0.25,
        attn_dim: int = 128,
        trans_dropout: float = 0.1,
        n_layers: int = 2,
        n_heads: int = 8,
        region_num: int | str = 8,
        epeg_k: int = 15,
        crmsa_k: int = 3,
        crmsa_heads: int = 8,
        crmsa_mlp: bool = False,
        all_shortcut: bool = False,
        da_act: str = "tanh",  # README commands --da_act=tanh (argparse default relu)
        crmsa_region_num: int | str = 8,  # official: CR-MSA always 8 × 8 regions
    ) -> None:
        super().__init__()
        if da_act not in ("tanh", "relu", "gelu"):
            raise ModelError("r2t-abmil", "da_act must be 'tanh', 'relu' or 'gelu'", value=da_act)
        if act not in _ACTS:
            raise ModelError("r2t-abmil", f"act must be one of {sorted(_ACTS)}", value=act)
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), _ACTS[act]())
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.encoder = R2TEncoder(
            dim,
            n_layers=n_layers,
            n_heads=n_heads,
            region_num=region_num,
            epeg_k=epeg_k,
            crmsa_k=crmsa_k,
            crmsa_heads=crmsa_heads,
            crmsa_mlp=crmsa_mlp,
            all_shortcut=all_shortcut,
            drop=trans_dropout,
            crmsa_region_num=crmsa_region_num,
        )
        self.pool = AttentionPool(dim, attn_dim, gated=False, bias=False, act=da_act)
        self.head = nn.Linear(dim, num_classes)
        _official_init(self)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        h = self.drop(self.fc(x))
        h = self.encoder(h, mask)
        pooled = self.pool(h, mask)
        return MILOutput(
            logits=self.head(pooled.embedding),
            embedding=pooled.embedding,
            attention=pooled.attention,
            attention_logits=pooled.logits,
        )


def _official_init(model: nn.Module) -> None:
    """Official ``initialize_weights``: Xavier-normal Linear/Conv2d, zero biases, LN = (1, 0)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
