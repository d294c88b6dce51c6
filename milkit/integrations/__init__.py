"""Adapters that let other MIL toolkits drive milkit models (optional dependencies)."""
