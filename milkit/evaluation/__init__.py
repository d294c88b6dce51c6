"""After training: metrics, run-level evaluation, attention heatmaps and exports, the run report."""
