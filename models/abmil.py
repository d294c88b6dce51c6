"""ABMIL: attention-based deep MIL (Ilse et al. 2018) in its CLAM "small" pathology layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.clam import CLAM_RECIPE
from milkit.models.layers.attention_pool import AttentionPool, make_act
from milkit.models.registry import register_aggregator


def init_xavier_(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear: ``initialize_weights`` of CLAM
    before 2024-04 (removed in mahmoodlab/CLAM d613a3d, 2024-04-06) and of DearCaat's MHIM-MIL /
    RRT-MIL (still used there)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def state_dict_from_clam(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a CLAM ``CLAM_SB`` state-dict onto ``abmil-gated`` (gated) or ``abmil`` (plain).

    The same mapping as ``milkit.models.load_official(state, "clam-abmil")`` (CLI ``milkit
    import-weights --family clam-abmil``), which also builds the model and says what it dropped;
    family ``clam`` imports into ``clam-sb``/``clam-mb`` and keeps the instance classifiers. CLAM keeps
    the tanh (V) and sigmoid (U) branches as separate Linears (``attention_a.0`` /
    ``attention_b.0``); ours are one fused Linear with rows ``[V; U]``. DataParallel ``module.``
    prefixes (CLAM's own demo checkpoint) are removed; the instance classifiers are dropped.

    Raises:
        KeyError: not a CLAM_SB state dict (CLAM_MB's per-class branches are not ABMIL).
    """
    from milkit.errors import MilkitError
    from milkit.models.official import convert_state, get_family, match_variant, read_state

    try:
        variant, state, _ = match_variant(get_family("clam-abmil"), read_state(state))
        if variant.model is None:
            raise MilkitError(variant.note)
        return convert_state(variant, state)[0]
    except MilkitError as err:
        raise KeyError(f"not a CLAM_SB state-dict: {err}") from None


@register_aggregator(
    "abmil",
    description="ABMIL (Ilse 2018), CLAM-small layout 1024→512, attention 256, not gated",
    gated=False,
)
@register_aggregator(
    "abmil-gated",
    description="ABMIL (Ilse 2018) with gated attention, CLAM-small layout (512/256, dropout .25)",
    gated=True,
)
@register_aggregator(
    "abmil-ilse",
    description="ABMIL exactly as Ilse's repo: M=500, L=128, K=1, no dropout, PyTorch init",
    fc_dim=500,  # AttentionDeepMIL model.py: self.M = 500
    attn_dim=128,  # AttentionDeepMIL model.py: self.L = 128
    gated=False,
    fc_dropout=0.0,
    attn_dropout=0.0,
    init="default",
)
@register_aggregator(
    "abmil-dattention",
    description="DearCaat's ABMIL baseline (MHIM/R2T 'DAttention'): 512, attention 128, relu",
    fc_dim=512,  # MHIM-MIL mhim.py: patch_to_emb Linear(1024, 512) + ReLU + Dropout(0.25)
    attn_dim=128,  # DAttention: Linear(512, 128, bias=False) + act + Linear(128, 1, bias=False)
    gated=False,
    fc_dropout=0.25,
    attn_dropout=0.0,
    attn_act="relu",  # --da_act default
    attn_bias=False,
    init="xavier",  # MHIM-MIL / RRT-MIL initialize_weights
)
class ABMIL(MILModel):
    """Attention-based deep MIL pooling with a linear bag classifier.

    Paper: Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.
    Code: github.com/AMLab-Amsterdam/AttentionDeepMIL; pathology layout from
    github.com/mahmoodlab/CLAM (``models/model_clam.py``, "small" size).

    Equations (bag ``X ∈ R^{N×D}``)::

        h_i = Dropout(ReLU(W_fc x_i + b_fc))                      (embedding, M = fc_dim)
        e_i = w^T tanh(V h_i)                 (plain, Eq. 8)   or
        e_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i))  (gated, Eq. 9)
        a = softmax_i(e),  z = Σ_i a_i h_i,  logits = W_c z + b_c  (Eq. 6-7)

    Registered names: ``abmil`` = the CLAM "small" configuration WITHOUT gating (Linear
    D→512 + ReLU + Dropout 0.25, tanh attention L=256 with Dropout 0.25, Linear 512→C);
    ``abmil-gated`` = the same WITH gating, i.e. CLAM's ``Attn_Net_Gated`` exactly;
    ``abmil-ilse`` = Ilse's repo (M=500, L=128, K=1, no dropout, PyTorch default init);
    ``abmil-dattention`` = DearCaat's baseline (MHIM-MIL / RRT-MIL "DAttention"), the layout of
    MHIM-MIL's ABMIL teacher and student (train it to get a ``teacher_init`` checkpoint).
    ``fc_dim=None`` drops the embedding layer (attention directly on the input features, as
    torchmil's ABMIL). Departures: multiclass softmax head (Ilse: one sigmoid output, binary
    tasks here are C=2); ``attention`` holds the softmax weights and ``attention_logits`` the
    pre-softmax ``e`` (values at padded positions are meaningless; use the mask).

    Init: PyTorch's default (``init="default"``), as CLAM since 2024-04-06 (commit d613a3d
    removed its Xavier ``initialize_weights``); ``init="xavier"`` = CLAM before that, and
    DearCaat's ``initialize_weights`` (``abmil-dattention`` uses it).

    ``training_preset`` = CLAM's recipe for the CLAM layout (``milkit.models.clam.CLAM_RECIPE``):
    Adam, lr 2e-4 (README commands ``--lr 2e-4``; main.py's argparse default is 1e-4), weight
    decay 1e-5 (``--reg``), at most 200 epochs, constant LR, class-balanced sampling
    (``--weighted_sample``), early stopping (``--early_stopping``) on validation loss with
    patience 20, stopping no earlier than after the 52nd epoch (``stop_epoch=50``, 0-based). (Ilse's repo: Adam lr 5e-4, betas (0.9, 0.999), weight decay
    ``10e-5`` = 1e-4, 20 epochs — pass these as overrides for ``abmil-ilse``.)

    Args:
        in_dim: instance feature dimension D.
        num_classes: C ≥ 2.
        fc_dim: size M of the embedding Linear (None: no embedding layer, M = D).
        attn_dim: attention hidden size L.
        gated: gated attention (Eq. 9).
        fc_dropout: dropout after the embedding ReLU.
        attn_dropout: dropout after each attention branch.
        branches: number K of attention branches (Ilse's ``ATTENTION_BRANCHES``).
        act: activation after the embedding Linear.
        attn_act: activation of the plain attention branch (paper: tanh; DearCaat: relu).
        attn_bias: biases in the attention Linears (DearCaat's DAttention has none).
        init: ``"default"`` (PyTorch; CLAM since 2024-04) or ``"xavier"`` (Xavier-normal weights,
            zero biases: CLAM before 2024-04, DearCaat's MHIM-MIL / RRT-MIL).
    """

    model_name = "abmil"

    permutation_invariant: ClassVar[bool] = True
    mil_respecting: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    training_preset: ClassVar[dict[str, Any]] = CLAM_RECIPE  # CLAM main.py, see models/clam.py

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        fc_dim: int | None = 512,  # CLAM size_dict["small"] = [1024, 512, 256]
        attn_dim: int = 256,  # CLAM "small" attention D
        gated: bool = False,
        fc_dropout: float = 0.25,  # CLAM --drop_out 0.25
        attn_dropout: float = 0.25,  # CLAM Attn_Net_Gated(dropout=True) -> Dropout(0.25)
        branches: int = 1,
        act: str | type[nn.Module] = "relu",
        attn_act: str | type[nn.Module] = "tanh",
        attn_bias: bool = True,
        init: str = "default",  # CLAM since 2024-04-06 (d613a3d): PyTorch default init
    ) -> None:
        super().__init__()
        if init not in ("xavier", "default"):
            raise ModelError("abmil", "init must be 'xavier' or 'default'", value=init)
        self.in_dim, self.num_classes = in_dim, num_classes
        if fc_dim is None:
            self.fc: nn.Module = nn.Identity()
            dim = in_dim
        else:
            act_layer = make_act(act)
            if isinstance(act_layer, nn.ReLU):  # in place: saves one (N, M) buffer at 10^5 tiles
                act_layer = nn.ReLU(inplace=True)
            layers: list[nn.Module] = [nn.Linear(in_dim, fc_dim), act_layer]
            if fc_dropout > 0:
                layers.append(nn.Dropout(fc_dropout))
            self.fc = nn.Sequential(*layers)
            dim = fc_dim
        self.pool = AttentionPool(
            dim,
            attn_dim,
            gated=gated,
            dropout=attn_dropout,
            bias=attn_bias,
            act=attn_act,
            branches=branches,
        )
        self.embed_dim = dim * branches
        self.head = nn.Linear(self.embed_dim, num_classes)
        if init == "xavier":
            init_xavier_(self)

    def embed_instances(self, x: Tensor) -> Tensor:
        """Instance embeddings ``h`` (B, N, M) (MHIM masks instances after this layer)."""
        return self.fc(x)

    def forward_embedded(self, h: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Everything after the instance embedding: pooling and head."""
        z, attention, logits = self.pool(h, mask)
        return MILOutput(
            logits=self.forward_head(z), embedding=z, attention=attention, attention_logits=logits
        )

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """(bag embedding (B, K·M), attention, attention logits) for ``x`` (B, N, D)."""
        return tuple(self.pool(self.fc(x), mask))

    def forward_head(self, embedding: Tensor) -> Tensor:
        """Class logits (B, C) from the bag embedding."""
        return self.head(embedding)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        return self.forward_embedded(self.fc(x), mask)
