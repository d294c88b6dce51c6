"""Patch encoders behind one registry (see ``feature_extraction.encoders.registry``)."""
