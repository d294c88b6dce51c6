"""Training: the run configuration (more of the training layer moves here over time)."""
