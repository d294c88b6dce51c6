"""Hub-hosted pathology ViT foundation models built with timm and loaded offline.

Architectures follow the official model cards and TRIDENT's ``patch_encoder_models/load.py``
(github.com/mahmoodlab/TRIDENT); weights come from ``--weights FILE`` or the Hugging Face cache.

- ``uni``: UNI v1 (Chen et al., "Towards a general-purpose foundation model for computational
  pathology", Nat. Med. 2024; github.com/mahmoodlab/UNI; hf MahmoodLab/UNI). ViT-L/16 with
  LayerScale 1e-5, class token output → 1024-d.
- ``uni2-h``: UNI2-h (same authors, 2025; hf MahmoodLab/UNI2-h). ViT-H/14, 24 blocks, 1536 wide,
  SwiGLU, 8 register tokens, no pos-embed on class token → 1536-d.
- ``virchow2``: Virchow2 (Zimmermann et al., "Virchow2: Scaling self-supervised mixed
  magnification models in pathology", arXiv:2408.00738; hf paige-ai/Virchow2). ViT-H/14 with
  4 registers and SwiGLU; embedding = class token ⊕ mean of patch tokens (registers excluded),
  1280 + 1280 = 2560-d, as the model card prescribes.
- ``h-optimus-0``: H-optimus-0 (Saillard et al., Bioptimus 2024; github.com/bioptimus/releases;
  hf bioptimus/H-optimus-0). ViT-g/14 DINOv2 with 4 registers, class token → 1536-d.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from milkit.feature_extraction.encoders.registry import (
    EncoderCfg,
    load_state_dict,
    load_strict,
    register_encoder,
)

_GATED_NC = "CC-BY-NC-ND-4.0 (gated)"


def timm_vit_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """timm architecture name and kwargs of an encoder (official model cards / TRIDENT)."""
    import timm

    if name == "uni":
        return "vit_large_patch16_224", {
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        }
    if name == "uni2-h":
        return "vit_giant_patch14_224", {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        }
    if name == "virchow2":
        return "vit_huge_patch14_224", {
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
        }
    if name == "h-optimus-0":
        return "vit_giant_patch14_reg4_dinov2", {
            "img_size": 224,
            "num_classes": 0,
            "global_pool": "token",
            "init_values": 1e-5,
            "dynamic_img_size": True,
        }
    raise KeyError(name)


def build_timm_vit(name: str, **overrides: Any) -> nn.Module:
    """The bare timm ViT of an encoder with random weights (``overrides`` for tests only)."""
    import timm

    arch, kwargs = timm_vit_kwargs(name)
    kwargs.update(overrides)
    return timm.create_model(arch, pretrained=False, **kwargs)


class ClsMeanPool(nn.Module):
    """Virchow embedding: class token ⊕ mean of patch tokens, skipping ``num_prefix`` tokens."""

    def __init__(self, vit: nn.Module, num_prefix: int) -> None:
        super().__init__()
        self.vit = vit
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)  # (B, 1 + registers + patches, C) with global_pool=""
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix :].mean(1)], dim=-1)


def wrap_vit(name: str, vit: nn.Module) -> nn.Module:
    """Add the encoder's pooling head (only Virchow2 needs one beyond timm's)."""
    if name == "virchow2":
        return ClsMeanPool(vit, num_prefix=1 + 4)  # class token + 4 registers
    return vit


def _build(cfg: EncoderCfg, weights: Path | None) -> nn.Module:
    vit = build_timm_vit(cfg.name)
    if weights is not None:
        load_strict(vit, load_state_dict(weights), weights, encoder=cfg.name)
    return wrap_vit(cfg.name, vit)


register_encoder(
    EncoderCfg(
        name="uni",
        embed_dim=1024,
        input_size=224,  # model card: Resize(224) + CenterCrop(224)
        precision="fp16",  # TRIDENT uni_v1
        hub_id="MahmoodLab/UNI",
        weights_file="pytorch_model.bin",
        license=_GATED_NC,
        paper="Chen et al., Nat. Med. 2024 (UNI)",
        interpolation="bilinear",
        description="UNI v1 ViT-L/16 pathology foundation model, 1024-d",
        extra={"alt_hub_ids": ("MahmoodLab/uni",)},
    )
)(_build)

register_encoder(
    EncoderCfg(
        name="uni2-h",
        embed_dim=1536,
        input_size=224,
        precision="bf16",  # TRIDENT uni_v2
        hub_id="MahmoodLab/UNI2-h",
        weights_file="pytorch_model.bin",
        license=_GATED_NC,
        paper="Chen et al., Nat. Med. 2024 / MahmoodLab 2025 (UNI2-h)",
        description="UNI2-h ViT-H/14 (SwiGLU, 8 registers) pathology foundation model, 1536-d",
    )
)(_build)

register_encoder(
    EncoderCfg(
        name="virchow2",
        embed_dim=2560,
        input_size=224,  # model card: timm config, bicubic, crop_pct 1.0
        precision="fp16",  # model card: fp16 autocast
        hub_id="paige-ai/Virchow2",
        weights_file="pytorch_model.bin",
        license=_GATED_NC,
        paper="Zimmermann et al., arXiv:2408.00738 (Virchow2)",
        interpolation="bicubic",
        description="Virchow2 ViT-H/14 (SwiGLU, 4 registers), class ⊕ mean patch tokens, 2560-d",
        extra={"alt_weights_files": ("model.safetensors",)},
    )
)(_build)

register_encoder(
    EncoderCfg(
        name="h-optimus-0",
        embed_dim=1536,
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),  # model card normalisation constants
        std=(0.211883, 0.230117, 0.177517),
        precision="fp16",  # model card: fp16 autocast
        hub_id="bioptimus/H-optimus-0",
        weights_file="pytorch_model.bin",
        license="Apache-2.0 (gated)",
        paper="Saillard et al., Bioptimus 2024 (H-optimus-0)",
        description="H-optimus-0 ViT-g/14 DINOv2 (4 registers) pathology model, 1536-d",
        extra={"alt_weights_files": ("model.safetensors",)},
    )
)(_build)
