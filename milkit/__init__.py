"""milkit: multiple-instance learning for computational pathology.

Stages: ``milkit.feature_extraction`` (slides → HDF5 bags), ``milkit.models`` (MIL aggregators),
and the rest of ``milkit`` (datasets, training, metrics, heatmaps, MIL assumption checks). The
first two live in the repository's top-level ``feature_extraction/`` and ``models/`` folders and
install only under these names.
"""

from milkit.errors import MilkitError

__version__ = "0.1.0"

__all__ = ["MilkitError", "__version__"]
