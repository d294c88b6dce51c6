"""milkit: multiple-instance learning for computational pathology.

Stages: ``milkit.feature_extraction`` (slides → HDF5 bags), ``milkit.models`` (MIL aggregators),
and the rest of ``milkit`` (datasets, training, metrics, heatmaps, MIL assumption checks). The
first two live in the repository's top-level ``feature_extraction/`` and ``models/`` folders and
install only under these names.
"""

from collections.abc import Callable
from importlib import import_module
from typing import Any

from milkit.errors import MilkitError

__version__ = "0.1.0"

__all__ = ["MilkitError", "__version__"]


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) giving ``exports`` (name -> submodule of ``package``)
    on first use, so that importing a light submodule does not import the heavy ones."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
