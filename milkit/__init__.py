"""milkit: multiple-instance learning for computational pathology.

Stages: ``feature_extraction`` (slides → HDF5 bags), ``models`` (MIL aggregators),
``milkit`` (datasets, training, metrics, heatmaps, MIL assumption checks).
"""

from milkit.errors import MilkitError

__version__ = "0.1.0"

__all__ = ["MilkitError", "__version__"]
