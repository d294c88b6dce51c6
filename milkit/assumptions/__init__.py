"""MIL assumption checks: the algorithmic unit tests of Raff & Holt (NeurIPS 2023).

- ``generators``: seeded synthetic tasks T1 (single-concept + poison), T2 (threshold A-and-B +
  poison), T3 (false frequency), each a training draw and a shifted, fresh test draw;
- ``runner``: train registered aggregators with milkit's trainer and give PASS / FAIL /
  DID NOT LEARN verdicts with bootstrap CIs;
- ``properties``: permutation, padding and monotonicity checks without training;
- ``report``: Markdown / CSV / JSON / PNG reports (``milkit check`` writes them).
"""

from milkit.assumptions.generators import MILDraw, MILTask, make_task
from milkit.assumptions.runner import (
    DID_NOT_LEARN,
    ERROR,
    FAIL,
    PASS,
    Candidate,
    CheckConfig,
    TestResult,
    run_checks,
)

__all__ = [
    "DID_NOT_LEARN",
    "ERROR",
    "FAIL",
    "PASS",
    "Candidate",
    "CheckConfig",
    "MILDraw",
    "MILTask",
    "TestResult",
    "make_task",
    "run_checks",
]
