"""Patch encoders behind one registry (see ``feature_extraction.encoders.registry``).

``create_encoder(name, weights=None, device="cpu") -> (PatchEncoder, EncoderCfg)``;
``list_encoders(pattern=None)``. Importing this package registers every encoder family but
loads no weights and touches no network.
"""

from milkit.feature_extraction.encoders import fast, resnet, vit  # noqa: F401  (registration)
from milkit.feature_extraction.encoders.registry import (
    EncoderCfg,
    PatchEncoder,
    create_encoder,
    get_encoder_cfg,
    list_encoders,
    register_encoder,
)

__all__ = [
    "EncoderCfg",
    "PatchEncoder",
    "create_encoder",
    "get_encoder_cfg",
    "list_encoders",
    "register_encoder",
]
