"""MambaMIL: state-space (Mamba) sequence modelling of the tile sequence + ABMIL pooling."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.clam import CLAM_RECIPE
from milkit.models.layers.attention_pool import AttentionPool
from milkit.models.layers.mamba_block import BiMamba, Mamba, SRMamba
from milkit.models.layers.ragged import apply_per_bag
from milkit.models.registry import register_aggregator

_MIXERS: dict[str, type[Mamba]] = {"srmamba": SRMamba, "mamba": Mamba, "bimamba": BiMamba}
_ACTS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


@register_aggregator(
    "mambamil", description="MambaMIL with SR-Mamba mixers (MICCAI 2024)", mixer="srmamba"
)
@register_aggregator(
    "mambamil-mamba", description="MambaMIL with unidirectional Mamba mixers", mixer="mamba"
)
@register_aggregator(
    "mambamil-bimamba", description="MambaMIL with bidirectional Mamba mixers", mixer="bimamba"
)
class MambaMIL(MILModel):
    """MambaMIL (Yang, Wang, Chen, "MambaMIL: Enhancing Long Sequence Modeling with Sequence
    Reordering in Computational Pathology", MICCAI 2024, arXiv 2403.06800; official code
    github.com/isyangshu/MambaMIL, ``models/MambaMIL.py``).

    Equations (one bag, instances in raster file order)::

        h⁰ = GELU(W_in x)                                        (B, N, 512)
        hˡ = hˡ⁻¹ + Mixer_l(LN_l(hˡ⁻¹)),  l = 1..layers            Mixer ∈ {SR-Mamba, Mamba, BiMamba}
        H  = LN(h^layers);  e_i = w^T tanh(V H_i) + c;  a = softmax(e)   (ABMIL, with biases)
        z  = Σ_i a_i H_i;   logits = W_cls z

    The mixers (``models.layers.mamba_block``) keep mamba-ssm's parameter names; the scan runs on
    mamba-ssm's CUDA kernels when importable, else on our chunked pure-PyTorch scan that equals
    the sequential reference (``models.layers.selective_scan``).

    Departures from the official code, all deliberate:

    - attention: the official forward returns ``A = None``; we return the ABMIL weights.
    - padded batches: the official code assumes one bag per batch. Padding would flow through
      the recurrence, so with a mask each bag is run at its own length (bags of equal length are
      grouped into one call); a padded batch equals its bags run one by one.
    - the official SRMamba slow path (no CUDA kernel) is broken (issue #7); our PyTorch path
      implements the kernel path's math.

    Initialisation: the official model calls ``initialize_weights`` on every module AFTER the
    mixers are built, which re-initialises every ``nn.Linear`` - including the mixers' in/x/dt/out
    projections - to Xavier-normal with zero bias, so ``dt_proj.bias`` ends at 0 (Δ₀ = softplus(0)
    ≈ 0.69), not mamba-ssm's inverse-softplus init. ``init="official"`` (default) reproduces that;
    ``init="mamba-ssm"`` keeps mamba-ssm's mixer initialisation (Xavier only outside the mixers).

    dtype: the forward runs in the input's dtype (float64 for exact checks; the official code
    casts ``x.float()``); as in mamba-ssm, ``A = −exp(A_log)``, ``D`` and the Δ bias are taken
    in float32 inside the mixers. ``A`` is the correctly rounded float32 (exp in float64, rounded
    once; ``mamba_block.ssm_a``), so float64 outputs are the same on every machine; a float32
    ``exp`` is 1 ulp off for some inputs on some CPUs, which moved them by up to 8e-10.

    Official settings: 2 layers, rate 5 (training scripts; argparse default 10), drop_out 0, GELU,
    Adam lr 2e-4, weight decay 1e-5, ≤ 200 epochs with early stopping on validation loss
    (CLAM's EarlyStopping: patience 20, not before 52 epochs), class-balanced sampling, batch 1;
    R50 (1024-d) or PLIP (512-d) features.

    Args:
        mixer: ``"srmamba"`` (``mambamil``), ``"mamba"`` or ``"bimamba"``.
        layers: number of residual mixer layers (2, official scripts).
        rate: SR-Mamba reordering rate R (5, official training scripts).
        dim: model width (512, hard-coded in the official model).
        dropout: dropout after the input projection (0, official scripts).
        act: input projection activation (``"gelu"``, official scripts).
        d_state, d_conv, expand: Mamba sizes (16, 4, 2; official model).
        attn_dim: ABMIL hidden size (128, official model).
        init: ``"official"`` or ``"mamba-ssm"`` (see above).
        backend: selective-scan backend (``"auto"``, ``"cuda"``, ``"torch"``, ``"ref"``).
        chunk_size: bags longer than this run the low-memory path: every mixer runs in
            activation-checkpointed chunks of this many tokens with the causal-conv and scan
            states carried (512; None = off). Same maths; a training step on a
            100k-tile bag then fits in a few GB on CPU.
    """

    model_name = "mambamil"

    permutation_invariant = False
    mil_respecting = False
    supports_padding = True
    # Official recipe (isyangshu/MambaMIL train_scripts/*.sh + main.py): CLAM's training loop and
    # its EarlyStopping class (same code and docstrings as CLAM's utils/core_utils.py), run with
    # --lr 2e-4 --reg 1e-5 --max_epochs 200 --early_stopping --weighted_sample, batch 1, no LR
    # schedule: exactly CLAM_RECIPE (stops at the earliest after 52 epochs, balanced sampling).
    training_preset: ClassVar[dict[str, Any]] = CLAM_RECIPE

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        mixer: str = "srmamba",
        layers: int = 2,
        rate: int = 5,
        dim: int = 512,
        dropout: float = 0.0,
        act: str = "gelu",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        attn_dim: int = 128,
        init: str = "official",
        backend: str = "auto",
        chunk_size: int | None = 512,
    ) -> None:
        super().__init__()
        if mixer not in _MIXERS:
            raise ModelError("mambamil", f"mixer must be one of {sorted(_MIXERS)}", value=mixer)
        if act not in _ACTS:
            raise ModelError("mambamil", f"act must be one of {sorted(_ACTS)}", value=act)
        if init not in ("official", "mamba-ssm"):
            raise ModelError("mambamil", "init must be 'official' or 'mamba-ssm'", value=init)
        if layers < 1:
            raise ModelError("mambamil", "layers must be >= 1", value=layers)
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, dim
        self.mixer_name = mixer
        fc: list[nn.Module] = [nn.Linear(in_dim, dim), _ACTS[act]()]
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        self.fc = nn.Sequential(*fc)
        extra = {"rate": rate} if mixer == "srmamba" else {}
        mixer_cls = _MIXERS[mixer]
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim),
                mixer_cls(
                    dim,
                    d_state=d_state,
                    d_conv=d_conv,
                    expand=expand,
                    backend=backend,
                    chunk_size=chunk_size,
                    **extra,
                ),
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, attn_dim, gated=False, bias=True, act="tanh")
        self.head = nn.Linear(dim, num_classes)
        skip = () if init == "official" else tuple(layer[1] for layer in self.layers)
        _xavier_init(self, skip)

    def encode(self, x: Tensor) -> Tensor:
        """Instance embeddings of unpadded bags of one length: (b, n, D_in) -> (b, n, dim).

        Long bags (more tokens than the mixers' ``chunk_size``) run each mixer chunk by chunk
        with checkpointed chunks (``models.layers.mamba_block``), so a layer keeps only a few
        (b, n, dim) tensors for backward. Checkpointing the whole residual layer on top would
        save ~2 of those per layer (0.4 GB at n = 10^5) for one more full recomputation of the
        layer (~+30% time); not worth it.
        """
        h = self.fc(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.norm(h)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        h = apply_per_bag(self.encode, x, mask)  # input dtype: float64 runs stay float64
        pooled = self.pool(h, mask)
        return MILOutput(
            logits=self.head(pooled.embedding),
            embedding=pooled.embedding,
            attention=pooled.attention,
            attention_logits=pooled.logits,
        )


def _xavier_init(model: nn.Module, skip: tuple[nn.Module, ...]) -> None:
    """Official ``initialize_weights``: Xavier-normal Linear weights, zero biases, LN = (1, 0)."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in model.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
