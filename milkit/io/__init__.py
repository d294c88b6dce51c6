"""The base layer's files: atomic writes, the bag file, the checkpoint file, the run folder, figures.

Everything in milkit (``milkit.models`` and ``milkit.feature_extraction`` included) may import
this package; it imports only ``milkit.errors`` and itself at module level. See
docs/architecture.md §3-§5.
"""
