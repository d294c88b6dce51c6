"""Cheap structural checks of an aggregator, no training needed (spec §4, "property tests").

- permutation invariance: shuffling the instances of a bag leaves the logits unchanged;
- padding/mask invariance: a bag scored inside a padded batch (random values at the padding)
  equals the bag scored alone;
- monotonicity (standard/threshold MIL): adding an instance (background, a strong instance, or
  the T1 poison N(-10, 0.1)) never lowers the positive-class evidence. For C = 2 the evidence is
  the log-odds ``logit_1 - logit_0``, which moves exactly opposite to the negative evidence, so
  one check covers both "cannot lower the positive score" and "cannot raise the negative one".

Each check reports a violation rate over random trials, next to what the model claims
(``permutation_invariant``, ``supports_padding``, ``mil_respecting``). A violation by a model
that does not claim the property is information ("not MIL-respecting"), not a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from milkit.assumptions.generators import POISON_DIST

# Tolerances: float32 sums reordered by a permutation or padding differ by ~1e-6 relative.
REL_TOL = 1e-4
ABS_TOL = 1e-5


@dataclass
class PropertyResult:
    """Violation rate of one property on ``trials`` random cases."""

    name: str
    claimed: bool
    trials: int
    violations: int
    worst: float  # largest violation found (absolute change / drop of the evidence)
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.violations / self.trials if self.trials else float("nan")

    @property
    def ok(self) -> bool:
        """True unless the model claims the property and violates it (or crashed)."""
        if self.error is not None:
            return False
        return not (self.claimed and self.violations > 0)


@dataclass
class PropertyReport:
    """All property results of one model."""

    model: str
    results: list[PropertyResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "results": [{**asdict(r), "rate": r.rate, "ok": r.ok} for r in self.results],
        }

    def get(self, name: str) -> PropertyResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)


def _evidence(logits: Tensor) -> Tensor:
    """Positive-class evidence per bag: log-odds for C = 2, log-softmax of the last class else."""
    if logits.shape[-1] == 2:
        return logits[..., 1] - logits[..., 0]
    return torch.log_softmax(logits, dim=-1)[..., -1]


def _close(a: Tensor, b: Tensor) -> tuple[bool, float]:
    diff = (a - b).abs()
    bound = ABS_TOL + REL_TOL * torch.maximum(a.abs(), b.abs())
    return bool((diff <= bound).all()), float(diff.max())


def _random_bags(
    rng: np.random.Generator, n: int, dim: int, min_size: int, max_size: int
) -> list[Tensor]:
    sizes = rng.integers(min_size, max_size + 1, size=n)
    return [torch.from_numpy(rng.normal(0.0, 1.0, (int(s), dim)).astype(np.float32)) for s in sizes]


def _extra_instance(rng: np.random.Generator, dim: int, kind: str) -> Tensor:
    if kind == "poison":
        mean, std = POISON_DIST
        x = rng.normal(mean, std, (1, dim))
    elif kind == "strong":
        x = rng.normal(0.0, 3.0, (1, dim))
    else:  # background
        x = rng.normal(0.0, 1.0, (1, dim))
    return torch.from_numpy(x.astype(np.float32))


@torch.no_grad()
def _score(model: nn.Module, bag: Tensor, device: torch.device) -> Tensor:
    return model(bag.unsqueeze(0).to(device)).logits[0].float().cpu()


@torch.no_grad()
def check_permutation(
    model: nn.Module, bags: Sequence[Tensor], rng: np.random.Generator, device: torch.device
) -> PropertyResult:
    claimed = bool(getattr(model, "permutation_invariant", True))
    violations, worst = 0, 0.0
    for bag in bags:
        perm = torch.from_numpy(rng.permutation(len(bag)))
        same, diff = _close(_score(model, bag, device), _score(model, bag[perm], device))
        violations += not same
        worst = max(worst, diff)
    return PropertyResult("permutation", claimed, len(bags), violations, worst)


@torch.no_grad()
def check_padding(
    model: nn.Module, bags: Sequence[Tensor], rng: np.random.Generator, device: torch.device
) -> PropertyResult:
    """Score bags in padded pairs (padding filled with large random values) vs alone."""
    claimed = bool(getattr(model, "supports_padding", True))
    if not claimed:
        return PropertyResult("padding", False, 0, 0, 0.0)
    violations, worst, trials = 0, 0.0, 0
    for a, b in zip(bags[0::2], bags[1::2]):
        n_max = max(len(a), len(b)) + 3  # at least three padded rows for every bag
        dim = a.shape[1]
        x = torch.from_numpy(rng.normal(0.0, 10.0, (2, n_max, dim)).astype(np.float32))
        mask = torch.zeros(2, n_max, dtype=torch.bool)
        for row, bag in enumerate((a, b)):
            x[row, : len(bag)] = bag
            mask[row, : len(bag)] = True
        batched = model(x.to(device), mask=mask.to(device)).logits.float().cpu()
        for row, bag in enumerate((a, b)):
            same, diff = _close(batched[row], _score(model, bag, device))
            violations += not same
            worst = max(worst, diff)
            trials += 1
    return PropertyResult("padding", claimed, trials, violations, worst)


@torch.no_grad()
def check_monotone(
    model: nn.Module,
    bags: Sequence[Tensor],
    rng: np.random.Generator,
    device: torch.device,
    kind: str,
) -> PropertyResult:
    """Add one instance of ``kind`` (background/strong/poison); the evidence must not drop."""
    claimed = bool(getattr(model, "mil_respecting", False))
    violations, worst = 0, 0.0
    for bag in bags:
        extra = _extra_instance(rng, bag.shape[1], kind)
        grown = torch.cat([bag, extra], dim=0)[torch.from_numpy(rng.permutation(len(bag) + 1))]
        before = _evidence(_score(model, bag, device))
        after = _evidence(_score(model, grown, device))
        drop = float(before - after)
        bound = ABS_TOL + REL_TOL * max(abs(float(before)), abs(float(after)))
        if drop > bound:
            violations += 1
            worst = max(worst, drop)
    return PropertyResult(f"monotone_{kind}", claimed, len(bags), violations, worst)


def check_properties(
    model: nn.Module,
    *,
    name: str | None = None,
    dim: int | None = None,
    trials: int = 64,
    seed: int = 0,
    bags: Sequence[np.ndarray | Tensor] | None = None,
    min_size: int = 2,
    max_size: int = 24,
    device: str | torch.device = "cpu",
) -> PropertyReport:
    """Run every property check on ``model`` (in eval mode; its mode is restored afterwards).

    Args:
        model: an aggregator following the ``MILModel`` contract.
        name: label for the report (default: the class name).
        dim: feature dimension of the random bags (default: ``model.in_dim``).
        trials: random bags per check.
        seed: seeds the one ``np.random.Generator`` used for every random draw.
        bags: optional base bags (e.g. a training draw) used instead of N(0, 1) random bags.
    """
    rng = np.random.default_rng(seed)
    dim = int(dim if dim is not None else model.in_dim)
    device = torch.device(device)
    if bags is None:
        base = _random_bags(rng, trials, dim, min_size, max_size)
    else:
        pick = rng.choice(len(bags), size=min(trials, len(bags)), replace=False)
        base = [torch.as_tensor(np.asarray(bags[int(i)]), dtype=torch.float32) for i in pick]
    report = PropertyReport(name or type(model).__name__)
    was_training = model.training
    model.eval()
    checks = [
        ("permutation", lambda: check_permutation(model, base, rng, device)),
        ("padding", lambda: check_padding(model, base, rng, device)),
        ("monotone_background", lambda: check_monotone(model, base, rng, device, "background")),
        ("monotone_strong", lambda: check_monotone(model, base, rng, device, "strong")),
        ("monotone_poison", lambda: check_monotone(model, base, rng, device, "poison")),
    ]
    try:
        for check_name, fn in checks:
            try:
                report.results.append(fn())
            except Exception as err:  # a model crash is a result to report, not a stop
                claimed = check_name.startswith("monotone") and bool(
                    getattr(model, "mil_respecting", False)
                )
                report.results.append(
                    PropertyResult(check_name, claimed, 0, 0, 0.0, f"{type(err).__name__}: {err}")
                )
    finally:
        model.train(was_training)
    return report


def monotone_violation_rate(report: PropertyReport) -> float:
    """Violations over all monotonicity trials of ``report`` (NaN if none ran)."""
    rows = [r for r in report.results if r.name.startswith("monotone") and r.trials]
    total = sum(r.trials for r in rows)
    return sum(r.violations for r in rows) / total if total else float("nan")
