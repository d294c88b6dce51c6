"""MIL assumption checks: the algorithmic unit tests of Raff & Holt (NeurIPS 2023)."""
