"""The base layer's compute settings: device choice, torch threads, OOM detection, DDP ranks.

Shared by extraction and training, so it sits beside ``milkit.io`` at the bottom of the layers
(docs/architecture.md §3) and imports only ``milkit.errors`` and ``milkit.io``.
"""
