"""MIL aggregators behind one contract: ``create(name, in_dim, num_classes, **overrides)``.

Every non-private module of this package is imported here so its ``@register_aggregator``
decorators run; adding a model is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from milkit.models.base import MILModel, MILOutput, check_bag_input
from milkit.models.registry import (
    accepted_parameters,
    create,
    get_entry,
    list_models,
    register_aggregator,
)

_NOT_MODELS = {"base", "registry", "layers", "official"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_MODELS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from milkit.models.official import load_official  # noqa: E402  (needs the registry filled)

__all__ = [
    "MILModel",
    "MILOutput",
    "accepted_parameters",
    "check_bag_input",
    "create",
    "get_entry",
    "list_models",
    "load_official",
    "register_aggregator",
]
