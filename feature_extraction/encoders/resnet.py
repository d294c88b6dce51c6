"""``resnet50-trunc``: ImageNet ResNet-50 cut after ``layer3`` + global average pool (1024-d).

The CLAM default patch encoder (Lu et al., "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nat. Biomed. Eng. 2021; github.com/mahmoodlab/CLAM,
``models/resnet_custom.py`` / ``models/builder.py``): timm ``resnet50.tv_in1k`` (He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016, torchvision weights), features of
``layer3`` (B, 1024, 14, 14) averaged to (B, 1024). Weights: ``--weights FILE``, the Hugging
Face cache (``timm/resnet50.tv_in1k``), or torchvision's own ImageNet V1 file in torch hub's
checkpoints (``resnet50-0676ba61.pth``, or ``resnet50-19c8e357.pth`` that CLAM downloads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from milkit.feature_extraction.encoders.registry import (
    EncoderCfg,
    load_state_dict,
    load_strict,
    register_encoder,
)

RESNET50_TRUNC = EncoderCfg(
    name="resnet50-trunc",
    embed_dim=1024,  # layer3 channels
    input_size=224,  # CLAM extract_features_fp.py: Resize(224) + ImageNet normalisation
    precision="fp32",  # CLAM and TRIDENT run it in fp32
    cpu_fuse=True,  # oneDNN fusion on CPU: as fast as torch.compile, ready in ~1 s (registry)
    hub_id="timm/resnet50.tv_in1k",
    weights_file="model.safetensors",
    license="BSD-3-Clause (torchvision ImageNet weights)",
    paper="He et al., CVPR 2016; truncation: Lu et al. (CLAM), Nat. Biomed. Eng. 2021",
    description="ImageNet ResNet-50 truncated after layer3 + avg-pool (CLAM default), 1024-d",
    extra={
        "alt_weights_files": ("pytorch_model.bin",),
        # torchvision's IMAGENET1K_V1 file (= timm's tv_in1k), as torchvision >= 0.13 names it,
        # and the older URL CLAM's models/resnet_custom.py loads (model_zoo.load_url): the same
        # weights, same keys as timm's resnet50.
        "torch_hub_files": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
        "torch_hub_pattern": "resnet50-*.pth",
        "torch_hub_not_used": {
            "resnet50-11ad3fa6.pth": "torchvision's IMAGENET1K_V2 weights; CLAM uses V1",
        },
        "torch_hub_download": 'python -c "import torchvision; '
        "torchvision.models.resnet50(weights='IMAGENET1K_V1')\"",
    },
)


class ResNet50Trunc(nn.Module):
    """ResNet-50 stem + layer1..layer3 + adaptive average pool: (B, 3, S, S) → (B, 1024)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = backbone.conv1, backbone.bn1
        self.act1, self.maxpool = backbone.act1, backbone.maxpool
        self.layer1, self.layer2, self.layer3 = backbone.layer1, backbone.layer2, backbone.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.pool(x).flatten(1)


def build_resnet50_backbone() -> nn.Module:
    """The full timm ResNet-50 (architecture of ``resnet50.tv_in1k``), random weights."""
    import timm

    return timm.create_model("resnet50", pretrained=False, num_classes=1000)


@register_encoder(RESNET50_TRUNC)
def build_resnet50_trunc(cfg: EncoderCfg, weights: Path | None) -> nn.Module:
    """Load a timm/torchvision ResNet-50 checkpoint strictly, then truncate after layer3.

    Full checkpoints (with ``layer4``/``fc``) and already-truncated ones both load; any other
    missing or unexpected key is an error.
    """
    backbone = build_resnet50_backbone()
    if weights is not None:
        sd = load_state_dict(weights)
        # torchvision's files use timm's key names; the 2017 file CLAM downloads predates the
        # BatchNorm ``num_batches_tracked`` buffer (a step counter, unused in eval): keep ours.
        for key, value in backbone.state_dict().items():
            if key.endswith(".num_batches_tracked") and key not in sd:
                sd[key] = value
        skip = ("layer4.", "fc.")
        load_strict(backbone, sd, weights, encoder=cfg.name, ignore_missing=skip)
    return ResNet50Trunc(backbone)
