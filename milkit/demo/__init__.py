"""``milkit demo``: the synthetic-cohort pipeline (slides → bags → CV → checks) and its report."""
