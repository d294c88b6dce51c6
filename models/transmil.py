"""TransMIL (Shao et al. 2021): cls token + two Nyström layers + PPEG position encoding."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from milkit.errors import ModelError
from milkit.models.abmil import init_xavier_
from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.layers.nystrom import NystromAttention
from milkit.models.registry import register_aggregator


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + NystromAttention(LayerNorm(x))``."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        num_landmarks: int,
        pinv_iterations: int,
        dropout: float,
        legacy_nystrom: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim,
            heads=heads,
            dim_head=dim // heads,  # TransMIL: dim_head = dim // 8
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual=True,
            residual_conv_kernel=33,  # lucidrains default, used by TransMIL
            dropout=dropout,
            legacy_crop=legacy_nystrom,
        )

    def forward(self, x: Tensor, query_row: int | None = None) -> tuple[Tensor, Tensor | None]:
        out, row = self.attn(self.norm(x), query_row=query_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: ``x + DW7(x) + DW5(x) + DW3(x)`` on the square token grid.

    ``forward`` is szc-TransMIL's (the caller lays the tokens out on the grid, cls first);
    ``forward_padded`` is MHIM-MIL's SAttention PPEG (``modules/emb_position.py``), which pads
    internally: the N instance tokens, then copies of the first ⌈√N⌉² − N, then zeros up to a
    7 × 7 grid if ⌈√N⌉ < 7, laid out row by row on that grid; the output is cropped back to N.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """``x`` (B, 1 + side², C): the cls token passes through; tokens fill rows of the grid."""
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).unflatten(2, (side, side))
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_padded(self, feat: Tensor) -> Tensor:
        """MHIM-MIL SAttention PPEG on instance tokens ``feat`` (B, N, C) → (B, N, C)."""
        b, n, c = feat.shape
        side = math.isqrt(n - 1) + 1 if n > 1 else 1  # ⌈√N⌉
        x = torch.cat([feat, feat[:, : side * side - n]], dim=1)
        if side < 7:  # official: at least a 7 × 7 grid, filled with zeros after the copies
            side = 7
            x = torch.cat([x, x.new_zeros(b, side * side - x.shape[1], c)], dim=1)
        grid = x.transpose(1, 2).unflatten(2, (side, side))
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return grid.flatten(2).transpose(1, 2)[:, :n]


@register_aggregator(
    "transmil", description="TransMIL (Shao 2021): Nyström transformer with PPEG, cls-token head"
)
@register_aggregator(
    "transmil-sattention",
    description="MHIM-MIL's TransMIL base (DearCaat SAttention): no square-padding tokens, 7×7 PPEG",
    layout="sattention",
    fc_dropout=0.25,  # MHIM-MIL main.py --dropout 0.25 (after patch_to_emb)
    init="xavier",  # MHIM initialize_weights: Xavier-normal Linear, LayerNorm (1, 0)
)
class TransMIL(MILModel):
    """Transformer-based correlated MIL.

    Paper: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for
    Whole Slide Image Classification", NeurIPS 2021. Code: github.com/szc19990412/TransMIL
    (``models/TransMIL.py``), with lucidrains' ``nystrom-attention``.

    Forward for one bag ``X ∈ R^{N×D}``::

        H = ReLU(X W_1 + b_1)                                    (D → 512)
        s = ⌈√N⌉;  H ← [H; H_{1..s²−N}]   (square padding by repeating the first tokens)
        H ← [cls; H]
        H ← H + NystromAttn(LN(H))                               (layer 1; 8 heads × 64, m = 256)
        H ← [cls; G + DW7(G) + DW5(G) + DW3(G)],  G = tokens on the s × s grid   (PPEG)
        H ← H + NystromAttn(LN(H))                               (layer 2)
        z = LN(H)_cls,  logits = W_2 z + b_2

    Masks and batches: the square padding, the Nyström landmark segments and the PPEG grid all
    depend on the bag's own length, so a padded batch cannot share one tensor and still equal
    the per-bag results. Bags of one length (no mask, or a mask with no padding) run as one
    batch; otherwise each bag runs alone on its real instances (in their order) and the results
    are stacked — padded batch results equal per-bag results exactly (tested).

    Attention output: the cls-token row of the last layer's Nyström approximation Ã per head,
    (B, H, N). The weights of a repeated (square-padding) token are added to its original
    instance and the cls→cls weight is dropped; ``attention_logits`` holds these raw values
    (Ã is not a softmax and can be slightly negative), ``attention`` = them clipped at 0 and
    renormalised over real instances (uniform if all clip to 0), 0 at padding. Computed without
    gradient. Order-sensitive (PPEG, landmark segments): ``permutation_invariant = False``.

    nystrom-attention version: TransMIL's requirements pin nystrom-attention 0.0.9, whose
    padding bug (output cropped from the wrong end of the front-padded sequence) shifts every
    output whenever the token count is not a multiple of 256 (≤ 0.18 in logits on the fidelity
    bags). milkit follows the FIXED library (≥ 0.0.10; equal to the official model run with
    0.0.14 to 6e-16); ``legacy_nystrom=True`` reproduces numbers from the pinned environment
    (and weights trained there, see ``milkit import-weights --family transmil``).

    ``layout="sattention"`` (registered as ``transmil-sattention``) is MHIM-MIL's ``selfattn``
    base (DearCaat/MHIM-MIL ``modules/satten.py`` SAttention + ``emb_position.py`` PPEG): the
    attention sequence is ``[cls; H]`` without square-padding copies, and PPEG pads internally
    (copies, then zeros up to a 7 × 7 grid) and crops back (``PPEG.forward_padded``); the cls
    attention row is then directly over the N instances. With Dropout 0.25 after the input
    Linear and Xavier-normal init (MHIM's ``initialize_weights``). The two layouts agree only
    at N = 1 and at square N ≥ 49.

    Departures: per-bag pseudo-inverse scaling (reference: batch-wide; identical for B = 1);
    ``fc_dropout`` (default 0, as the official code) and ``init="xavier"`` exist for MHIM-MIL's
    TransMIL base (Dropout 0.25, Xavier-normal init).
    ``training_preset``: official config ``Camelyon/TransMIL.yaml``: Lookahead(RAdam) lr 2e-4,
    weight decay 1e-5, 200 epochs, batch 1, gradient accumulation 2, patience 10 (fp16 there) —
    approximated here by Adam (the trainer has no Lookahead/RAdam), constant LR, early stopping
    on validation loss.
    """

    model_name = "transmil"

    permutation_invariant: ClassVar[bool] = False
    mil_respecting: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    training_preset: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 2e-4,  # TransMIL.yaml: Optimizer lr 0.0002
        "weight_decay": 1e-5,  # TransMIL.yaml: weight_decay 0.00001
        "epochs": 200,  # TransMIL.yaml: General.epochs 200
        "scheduler": "none",
        "batch_size": 1,
        "accumulate": 2,  # TransMIL.yaml: General.grad_acc 2
        "patience": 10,  # TransMIL.yaml: General.patience 10
        "monitor": "val_loss",
    }

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        dim: int = 512,  # TransMIL.py: _fc1 Linear(1024, 512)
        heads: int = 8,  # TransLayer: heads=8, dim_head=dim // 8
        num_landmarks: int = 256,  # TransLayer: num_landmarks=dim // 2
        pinv_iterations: int = 6,  # TransLayer: pinv_iterations=6
        attn_dropout: float = 0.1,  # TransLayer: NystromAttention(dropout=0.1)
        fc_dropout: float = 0.0,  # official: none; MHIM-MIL's base uses 0.25
        init: str = "default",
        layout: str = "szc",  # "szc" (TransMIL repo) | "sattention" (MHIM-MIL's base)
        legacy_nystrom: bool = False,  # True: nystrom-attention 0.0.9 (TransMIL's pin)
    ) -> None:
        super().__init__()
        if init not in ("xavier", "default"):
            raise ModelError("transmil", "init must be 'xavier' or 'default'", value=init)
        if layout not in ("szc", "sattention"):
            raise ModelError("transmil", "layout must be 'szc' or 'sattention'", value=layout)
        self.layout, self.legacy_nystrom = layout, bool(legacy_nystrom)
        if dim % heads:
            raise ModelError("transmil", f"dim ({dim}) must be divisible by heads ({heads})")
        self.in_dim, self.num_classes, self.embed_dim, self.heads = in_dim, num_classes, dim, heads
        layers: list[nn.Module] = [nn.Linear(in_dim, dim), nn.ReLU()]
        if fc_dropout > 0:
            layers.append(nn.Dropout(fc_dropout))
        self.fc = nn.Sequential(*layers)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))  # official: torch.randn
        kw = dict(
            heads=heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=attn_dropout,
            legacy_nystrom=bool(legacy_nystrom),
        )
        self.layer1 = TransLayer(dim, **kw)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, **kw)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        if init == "xavier":
            init_xavier_(self)

    def embed_instances(self, x: Tensor) -> Tensor:
        """Instance embeddings (B, N, dim) (MHIM masks instances after this layer)."""
        return self.fc(x)

    def _tokens(self, h: Tensor) -> tuple[Tensor, int]:
        """[cls; h; first tokens repeated to fill the ⌈√n⌉² grid] and the grid side (szc);
        [cls; h] and side 0 for the SAttention layout (its PPEG pads internally)."""
        if self.layout == "sattention":
            return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1), 0
        n = h.shape[1]
        side = math.isqrt(n - 1) + 1 if n > 1 else 1  # ⌈√n⌉
        add = side * side - n
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h, h[:, :add]], dim=1), side

    def _forward_same_length(self, h: Tensor, attn_layer: int) -> tuple[Tensor, Tensor]:
        """Bags of equal length ``h`` (B, n, dim) -> (z (B, dim), raw cls attention (B, H, n))."""
        n = h.shape[1]
        h, side = self._tokens(h)
        add = side * side - n
        h, row1 = self.layer1(h, query_row=0 if attn_layer == 0 else None)
        if self.layout == "sattention":
            h = torch.cat([h[:, :1], self.pos_layer.forward_padded(h[:, 1:])], dim=1)
        else:
            h = self.pos_layer(h, side)
        h, row2 = self.layer2(h, query_row=0 if attn_layer != 0 else None)
        row = (row1 if attn_layer == 0 else row2)[..., 1:]  # type: ignore[index]  # drop cls
        raw = row[..., :n].clone()
        if add > 0:
            raw[..., :add] += row[..., n:]  # repeated tokens are the same instances
        return self.norm(h)[:, 0], raw

    def _class_aware_same_length(self, h: Tensor) -> Tensor:
        n = h.shape[1]
        tokens, _ = self._tokens(h)
        attn = self.layer1.attn
        x = self.layer1.norm(tokens)
        _, row = attn(x, query_row=0)
        v = x @ attn.to_qkv.weight[2 * attn.heads * attn.dim_head :].T
        v = rearrange(v, "b n (h d) -> b h n d", h=attn.heads)[:, :, 1 : n + 1]
        feat = rearrange(row[..., 1 : n + 1, None] * v, "b h n d -> b n (h d)")
        logits = attn.to_out(feat) @ self.head.weight.T + self.head.bias[0]
        return logits.softmax(dim=-1).amax(dim=-1)

    @torch.no_grad()
    def class_aware_scores(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """MHIM-MIL v2 ``attn2score`` for TransMIL, (B, N), 0 at padding.

        Per instance: per-head layer-1 cls attention times that head's value, heads
        concatenated, layer-1 output projection, then the classifier weights plus the FIRST
        class bias (the official ``get_pseudo_score_trans``; a shared bias cancels in the
        softmax), softmax over classes, max over classes.
        """
        if mask is None or bool(mask.all()):
            return self._class_aware_same_length(h)
        scores = h.new_zeros(h.shape[:2])
        for i in range(h.shape[0]):
            scores[i, mask[i]] = self._class_aware_same_length(h[i : i + 1, mask[i]])[0]
        return scores

    def forward_embedded(
        self, h: Tensor, mask: Tensor | None = None, attn_layer: int = -1
    ) -> MILOutput:
        """Everything after the instance embedding; ``attn_layer`` 0 or -1 picks the layer whose
        cls attention is returned (MHIM-MIL v1 masks with layer 0)."""
        b, n, _ = h.shape
        if mask is None or bool(mask.all()):
            z, raw = self._forward_same_length(h, attn_layer)
        else:
            zs, raws = [], []
            for i in range(b):
                zi, ri = self._forward_same_length(h[i : i + 1, mask[i]], attn_layer)
                zs.append(zi)
                full = ri.new_zeros(1, ri.shape[1], n)
                full[..., mask[i]] = ri
                raws.append(full)
            z, raw = torch.cat(zs), torch.cat(raws)
        attention = raw.clamp_min(0.0)
        if mask is not None:
            attention = attention * mask[:, None].to(attention.dtype)
        total = attention.sum(dim=-1, keepdim=True)
        if bool((total <= 0).any()):  # all weights clipped: fall back to uniform over real ones
            uniform = torch.ones_like(attention)
            if mask is not None:
                uniform = uniform * mask[:, None].to(attention.dtype)
            attention = torch.where(total > 0, attention, uniform)
            total = attention.sum(dim=-1, keepdim=True)
        attention = attention / total
        if mask is not None:
            raw = raw * mask[:, None].to(raw.dtype)
        return MILOutput(
            logits=self.head(z), embedding=z, attention=attention, attention_logits=raw
        )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, mask, model=self.model_name)
        return self.forward_embedded(self.fc(x), mask)
