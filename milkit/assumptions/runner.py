"""Run registered aggregators through the MIL assumption tests and give each a verdict.

For every (model, test, seed): draw the task (``generators.make_task``), build the model with
``models.create(name, D, 2, **overrides)``, train it with the normal milkit training loop
(``milkit.training.trainer.fit_model``) on the training draw, score AUC on the training draw and on the
shifted test draw. Over seeds: mean test AUC with a bootstrap 95% CI (bags resampled within each
seed's test draw, AUCs averaged over seeds), and a verdict (spec §3):

- ``FAIL``: the model learned the MIL-violating shortcut: mean test AUC < 0.5 - δ, or the CI's
  upper end < 0.5. A fail is reported even when the training fit is imperfect: a test AUC far
  below chance is evidence of the shortcut whatever the fit (spec: under-training can only hide
  a violation, not fake one).
- ``DID NOT LEARN``: otherwise, if the mean training AUC < ``train_auc_threshold`` — the model
  did not fit the training draw, so its test AUC says nothing about the assumption.
- ``PASS``: otherwise.
- ``ERROR``: the model crashed (message kept; the run goes on with the next job).

Training recipe (lean on purpose so the whole zoo runs on a CPU in minutes; not any paper's
recipe): AdamW lr 2e-3, weight decay 1e-5, cosine schedule over at most ``epochs`` = 40, batch
size 16 (padded bags with a mask; 1 for models with ``supports_padding = False``), early
stopping with patience 8 on the AUC of the *training* draw (the check wants the training fit;
the trainer keeps the best epoch), the model's own hooks (aux losses, EMA teachers).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from milkit.assumptions.generators import TEST_NAMES, MILDraw, MILTask, make_task
from milkit.errors import MilkitError

PASS = "PASS"
FAIL = "FAIL"
DID_NOT_LEARN = "DID NOT LEARN"
ERROR = "ERROR"

# Per-model size overrides for speed (D = 16 synthetic features do not need 512-wide layers).
# Applied only for parameters the model accepts; a name missing here gets the generic rule of
# ``check_overrides`` (integer width parameters above ``SMALL_WIDTH`` are reduced to it).
SMALL_WIDTH = 64
SMALL_OVERRIDES: dict[str, dict[str, Any]] = {
    "mi-net": {"hidden": (64, 32), "dropout": 0.0},
    "threshold-mil": {"hidden": (64, 32)},  # num_concepts stays 6
    # Nystrom attention: landmarks scale with the width (official: dim // 2 = 256 for 512)
    "transmil": {"dim": 64, "num_landmarks": 32},
    "mhim-transmil": {"dim": 64, "num_landmarks": 32},
    # wrappers around a base aggregator: shrink the base through base_kwargs
    "aem": {"base_kwargs": {"fc_dim": 64, "attn_dim": 64}},
    "scmil": {"proj_dim": 64, "base_kwargs": {"fc_dim": 64, "attn_dim": 64}},
    "scmil-abmil": {"proj_dim": 64, "base_kwargs": {"fc_dim": 64, "attn_dim": 64}},
}
# Parameter names treated as layer widths by the generic rule (exact names or suffixes).
_WIDTH_NAMES = ("dim", "hidden", "width", "size", "d_model", "channels")
_NOT_WIDTH = ("in_dim", "num_classes", "patch_size", "kernel_size", "window_size", "d_state")


@dataclass
class CheckConfig:
    """Parameters of a check run; every default is the documented one.

    Attributes:
        tests: which tests (``t1``, ``t2``, ``t3``).
        seeds: task and training seeds (spec: ≥ 3).
        num_train, num_test, dim: task sizes (spec defaults 400 / 400, D = 16).
        task_params: extra generator parameters (e.g. ``{"bag_size": 10}``).
        epochs, patience, lr, weight_decay, batch_size: the lean training recipe (module doc).
        train_auc_threshold: below this mean training AUC the verdict is DID NOT LEARN.
        delta: FAIL when mean test AUC < 0.5 - delta.
        n_boot, alpha: bootstrap resamples and CI level (95%).
        device: ``cpu`` (default: tiny models gain nothing from a GPU) or ``auto``/``cuda``.
        overrides: per-model constructor overrides, replacing ``SMALL_OVERRIDES``.
        small: apply the size reductions (``SMALL_OVERRIDES`` / generic rule).
    """

    tests: tuple[str, ...] = TEST_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    num_train: int = 400
    num_test: int = 400
    dim: int = 16
    task_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    patience: int | None = 8
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 16
    train_auc_threshold: float = 0.9
    delta: float = 0.1
    n_boot: int = 1000
    alpha: float = 0.05
    device: str = "cpu"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    small: bool = True

    def __post_init__(self) -> None:
        self.tests = tuple(t.strip().lower() for t in self.tests)
        bad = [t for t in self.tests if t not in TEST_NAMES]
        if bad or not self.tests:
            raise MilkitError(
                "unknown assumption test(s)", value=bad, hint=f"choose from {', '.join(TEST_NAMES)}"
            )
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise MilkitError("need at least one seed", value=self.seeds)
        if not 0.0 < self.train_auc_threshold <= 1.0:
            raise MilkitError(
                "train_auc_threshold must be in (0, 1]", value=self.train_auc_threshold
            )


@dataclass(frozen=True)
class Candidate:
    """A model to check that is not (or not only) a registry name: ``build(in_dim, C)``."""

    name: str
    build: Callable[[int, int], Any]
    mil_respecting: bool = False


@dataclass
class SeedResult:
    """One trained model on one (test, seed)."""

    seed: int
    train_auc: float
    test_auc: float
    epochs: int
    wall_s: float
    test_labels: np.ndarray | None = None
    test_scores: np.ndarray | None = None
    error: str | None = None


@dataclass
class TestResult:
    """The aggregated outcome of one model on one test."""

    __test__ = False  # not a pytest test class despite the name

    model: str
    test: str
    verdict: str
    train_auc: float
    test_auc: float
    ci_low: float
    ci_high: float
    mil_respecting: bool
    overrides: dict[str, Any]
    seeds: list[SeedResult]
    wall_s: float
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestResult:
        """Inverse of ``to_dict`` (a ``report.json`` result), without the per-bag test scores."""
        nan = float("nan")
        seeds = [
            SeedResult(
                int(s["seed"]),
                _num(s.get("train_auc")),
                _num(s.get("test_auc")),
                int(s.get("epochs") or 0),
                float(s.get("wall_s") or 0.0),
                error=s.get("error"),
            )
            for s in data.get("per_seed", [])
        ]
        return cls(
            model=data["model"], test=data["test"], verdict=data["verdict"],
            train_auc=_num(data.get("train_auc")), test_auc=_num(data.get("test_auc")),
            ci_low=_num(data.get("ci_low", nan)), ci_high=_num(data.get("ci_high", nan)),
            mil_respecting=bool(data.get("mil_respecting")),
            overrides=dict(data.get("overrides") or {}), seeds=seeds,
            wall_s=float(data.get("wall_s") or 0.0), error=data.get("error"),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "seeds"}
        out["overrides"] = {k: _jsonable(v) for k, v in self.overrides.items()}
        out["per_seed"] = [
            {
                "seed": s.seed,
                "train_auc": s.train_auc,
                "test_auc": s.test_auc,
                "epochs": s.epochs,
                "wall_s": s.wall_s,
                "error": s.error,
            }
            for s in self.seeds
        ]
        return out


def _num(value: Any) -> float:
    """A JSON number (``null`` for NaN) as a float."""
    return float("nan") if value is None else float(value)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC (``milkit.training.metrics.binary_auc``: scikit-learn); NaN if a class is missing."""
    from milkit.training.metrics import binary_auc

    return binary_auc(np.asarray(labels).astype(bool), np.asarray(scores))


def _auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise AUC of (R, n) label/score matrices (``milkit.training.metrics.auc_rows``)."""
    from milkit.training.metrics import auc_rows

    return auc_rows(labels, scores)


def bootstrap_mean_auc(
    draws: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of the seed-averaged AUC: bags resampled with replacement within each draw.

    ``draws`` holds one ``(labels, scores)`` pair per seed. Resamples missing a class are dropped.
    """
    rng = np.random.default_rng(seed)
    per_seed = []
    for labels, scores in draws:
        labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
        idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
        per_seed.append(_auc_rows(labels[idx], scores[idx]))
    means = np.mean(np.stack(per_seed), axis=0)
    means = means[np.isfinite(means)]
    if means.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def verdict(
    train_auc: float, test_auc: float, ci_high: float, *, threshold: float, delta: float
) -> str:
    """The spec §3 rule (see the module docstring for the order of the checks)."""
    if not np.isfinite(test_auc) or not np.isfinite(train_auc):
        return ERROR
    if test_auc < 0.5 - delta or (np.isfinite(ci_high) and ci_high < 0.5):
        return FAIL
    if train_auc < threshold:
        return DID_NOT_LEARN
    return PASS


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


def _is_width(param: str) -> bool:
    if param in _NOT_WIDTH or param.startswith(("num_", "n_")):
        return False
    return any(param == w or param.endswith(w) or param.startswith(w) for w in _WIDTH_NAMES)


def check_overrides(name: str, cfg: CheckConfig | None = None) -> dict[str, Any]:
    """Constructor overrides used by the check for model ``name`` (see ``SMALL_OVERRIDES``)."""
    from milkit import models

    cfg = cfg or CheckConfig()
    entry = models.get_entry(name)
    if entry.name in cfg.overrides:
        return dict(cfg.overrides[entry.name])
    if not cfg.small:
        return {}
    if entry.name in SMALL_OVERRIDES:
        return dict(SMALL_OVERRIDES[entry.name])
    out: dict[str, Any] = {}
    params = inspect.signature(entry.cls.__init__).parameters
    for pname in models.accepted_parameters(entry.cls):
        default = entry.preset.get(pname, params[pname].default)
        if isinstance(default, bool) or not isinstance(default, int):
            continue
        if _is_width(pname) and default > SMALL_WIDTH:
            out[pname] = SMALL_WIDTH
    return out


# --------------------------------------------------------------------------------------------
# Training through the normal milkit loop
# --------------------------------------------------------------------------------------------


def _training_api() -> Any:
    from milkit.training import trainer as train

    return train


def _dataset(draw: MILDraw) -> Any:
    from milkit.data.datasets import InMemoryBagDataset

    return InMemoryBagDataset(draw.bags, draw.labels, slide_ids=draw.slide_ids())


def _build(model: str | Candidate, dim: int, overrides: dict[str, Any]) -> Any:
    from milkit import models

    if isinstance(model, Candidate):
        return model.build(dim, 2)
    return models.create(model, dim, 2, **overrides)


def train_and_score(
    model: str | Candidate, task: MILTask, cfg: CheckConfig, overrides: dict[str, Any]
) -> SeedResult:
    """Build, train (milkit's trainer) and score one model on one task draw."""
    import torch

    train_api = _training_api()
    t0 = time.perf_counter()
    torch.manual_seed(task.seed)
    model = _build(model, cfg.dim, overrides)
    batch_size = cfg.batch_size if getattr(model, "supports_padding", True) else 1
    config = train_api.TrainConfig(
        epochs=cfg.epochs,
        patience=cfg.patience,
        monitor="val_auc",
        optimizer="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        scheduler="cosine",
        batch_size=batch_size,
        seed=task.seed,
        device=cfg.device,
        amp=False,
        progress=False,
    )
    train_ds, test_ds = _dataset(task.train), _dataset(task.test)
    # Early stopping on the training draw itself: the check wants the training fit, and the
    # trainer keeps the epoch with the best training AUC. The trainer's warnings about a small or
    # saturated validation set speak of a held-out set; here that is the training draw on
    # purpose, and a perfect training fit is the goal, so they are not shown.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="validation AUC saturated", category=UserWarning)
        fit = train_api.fit_model(model, train_ds, config, val_ds=_dataset(task.train))
    scores = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        pred = train_api.predict(model, ds, batch_size=batch_size, device=cfg.device)
        scores[split] = (np.asarray(pred.labels), np.asarray(pred.probs)[:, 1])
    return SeedResult(
        seed=task.seed,
        train_auc=auc_score(*scores["train"]),
        test_auc=auc_score(*scores["test"]),
        epochs=int(getattr(fit, "best_epoch", cfg.epochs - 1)) + 1,
        wall_s=time.perf_counter() - t0,
        test_labels=scores["test"][0],
        test_scores=scores["test"][1],
    )


def aggregate(
    model_name: str,
    test: str,
    seeds: list[SeedResult],
    cfg: CheckConfig,
    overrides: dict[str, Any],
    mil_respecting: bool,
) -> TestResult:
    """Seed results → one ``TestResult`` with mean AUCs, bootstrap CI and verdict."""
    ok = [s for s in seeds if s.error is None]
    wall = sum(s.wall_s for s in seeds)
    errors = [s.error for s in seeds if s.error is not None]
    if not ok:
        nan = float("nan")
        return TestResult(
            model_name, test, ERROR, nan, nan, nan, nan, mil_respecting, overrides, seeds, wall,
            errors[0] if errors else "no seed ran",
        )  # fmt: skip
    train_auc = float(np.mean([s.train_auc for s in ok]))
    test_auc = float(np.mean([s.test_auc for s in ok]))
    low, high = bootstrap_mean_auc(
        [(s.test_labels, s.test_scores) for s in ok], n_boot=cfg.n_boot, alpha=cfg.alpha
    )
    result = verdict(train_auc, test_auc, high, threshold=cfg.train_auc_threshold, delta=cfg.delta)
    if errors:  # some seeds crashed: keep the verdict of the others but say so
        result = ERROR if result == PASS else result
    return TestResult(
        model_name, test, result, train_auc, test_auc, low, high, mil_respecting, overrides,
        seeds, wall, errors[0] if errors else None,
    )  # fmt: skip


def run_checks(
    candidates: Iterable[str | Candidate],
    cfg: CheckConfig | None = None,
    *,
    progress: bool = True,
    on_result: Callable[[TestResult], None] | None = None,
) -> list[TestResult]:
    """Run every (model, test, seed); a crashing model is recorded as ERROR and the run goes on.

    ``candidates`` are registry names or ``Candidate`` objects (hand-made models). Task draws
    are made once per (test, seed) and shared by all models.
    """
    from milkit import models

    cfg = cfg or CheckConfig()
    resolved = [c if isinstance(c, Candidate) else models.get_entry(c).name for c in candidates]
    tasks: dict[tuple[str, int], MILTask] = {}
    jobs = [(c, t) for c in resolved for t in cfg.tests]
    bar = _progress(len(jobs) * len(cfg.seeds), enabled=progress)
    results: list[TestResult] = []
    for cand, test in jobs:
        if isinstance(cand, Candidate):
            name, overrides, respecting = cand.name, {}, cand.mil_respecting
        else:
            name, overrides = cand, check_overrides(cand, cfg)
            respecting = bool(getattr(models.get_entry(cand).cls, "mil_respecting", False))
        seed_results = []
        for seed in cfg.seeds:
            bar.set_description(f"{name} {test} seed {seed}")
            key = (test, seed)
            if key not in tasks:
                tasks[key] = make_task(
                    test,
                    seed,
                    num_train=cfg.num_train,
                    num_test=cfg.num_test,
                    dim=cfg.dim,
                    **cfg.task_params,
                )
            t0 = time.perf_counter()
            try:
                seed_results.append(train_and_score(cand, tasks[key], cfg, overrides))
            except Exception as err:  # record per-job failures and go on (batch-job rule)
                nan = float("nan")
                msg = f"{type(err).__name__}: {err}"
                seed_results.append(
                    SeedResult(seed, nan, nan, 0, time.perf_counter() - t0, error=msg)
                )
            bar.update(1)
        result = aggregate(name, test, seed_results, cfg, overrides, respecting)
        results.append(result)
        if on_result is not None:
            on_result(result)
    bar.close()
    return results


# Bags in the calibration draw of ``estimate_fit_seconds``: small enough to cost about a
# second for the small models, large enough that per-bag work dominates the fixed costs.
CALIBRATION_BAGS = 32


def estimate_fit_seconds(
    model: str | Candidate, cfg: CheckConfig, *, calibration_bags: int = CALIBRATION_BAGS
) -> float:
    """Upper estimate of one fit's wall time (seconds) under ``cfg``, from real calibration fits.

    Trains ``model`` (the same trainer, batch size and overrides as a check) on a
    ``calibration_bags``-bag draw of the first configured test for 1 epoch (discarded: it
    absorbs one-time costs such as lazy imports), 1 epoch and 3 epochs; the difference gives
    the time per epoch, the rest the per-fit cost (building, scoring), and both are scaled to
    ``cfg.num_train`` bags and ``cfg.epochs`` epochs. An upper estimate: early stopping
    (``cfg.patience``) usually ends a fit sooner. Costs five short epochs per model.
    """
    n = max(2, min(calibration_bags, cfg.num_train))
    overrides = None
    walls = []
    for epochs in (1, 1, 3):
        small = CheckConfig(**{**asdict(cfg), "num_train": n, "num_test": n, "epochs": epochs,
                               "patience": None, "seeds": (0,)})  # fmt: skip
        if overrides is None:
            overrides = {} if isinstance(model, Candidate) else check_overrides(model, small)
        task = make_task(small.tests[0], 0, num_train=n, num_test=n, dim=small.dim,
                         **small.task_params)  # fmt: skip
        walls.append(train_and_score(model, task, small, overrides).wall_s)
    per_epoch = max(walls[2] - walls[1], 0.0) / 2
    per_fit = max(walls[1] - per_epoch, 0.0)
    return (per_fit + per_epoch * cfg.epochs) * (cfg.num_train / n)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="fit", dynamic_ncols=True)
