"""``milkit demo``: the whole product end to end on a synthetic cohort, offline, in minutes.

Stages (each reuses its finished output when the demo is rerun into the same folder)::

    OUT/slides/   synthetic slides (+ ground-truth masks), labels.csv, cohort.json
    OUT/bags/     one <slide_id>.h5 per slide (fast weight-free encoder), qc/, manifest.csv
    OUT/labels.csv  the training table: slides whose bag is complete
    OUT/run/      grouped k-fold cross-validation (inner validation split, early stopping)
    OUT/check/    MIL assumption checks of the chosen model (report.{md,csv,json,png})
    OUT/report/   index.html + report.md + img/ (metrics, ROC, QC, heatmaps, checks)

About half of the slides carry planted tumour regions covering a few percent of the tissue; the
label is "tumour" or "normal". Because the tumour masks are known, the report can show how much
of the model's top-decile attention lands on tumour tiles compared with chance.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from milkit.errors import MilkitError
from milkit.io.atomic import atomic_write_json, atomic_write_text, json_text
from milkit.io.runs import METRICS_FILE, fold_dir
from milkit.runtime.oom import is_out_of_memory
from milkit.training.metrics import format_number

# Demo defaults, sized for < 5 minutes on 2 CPU cores (see module docstring of milkit.commands.demo)
DEFAULT_SLIDES = 24
DEFAULT_SIZE = 4096  # level-0 px per side at 0.5 µm/px: ~100-160 tissue tiles of 256 px
DEFAULT_EPOCHS = 20
TUMOUR_FRACTION = 0.03  # planted tumour share of the tissue: "a few percent", as in real slides
SLIDE_MPP = 0.5  # 20x scan
STAGES = ("slides", "bags", "run", "check", "report")

# Lean recipe of the assumption checks inside the demo (the full `milkit check` uses more seeds
# and larger draws): one seed, 150 + 150 bags, 20 epochs, 200 bootstrap resamples.
CHECK_KW = {
    "seeds": (0,),
    "num_train": 150,
    "num_test": 150,
    "epochs": 20,
    "patience": 5,
    "n_boot": 200,
}


@dataclass
class DemoResult:
    """Everything the demo produced: folders, per-fold and summary metrics, checks, timings."""

    out_dir: Path
    index_html: Path
    report_md: Path
    model: str
    n_slides: int
    class_names: list[str]
    fold_metrics: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    localisation: dict[str, float]
    score_kind: str = "attention"  # what the heatmaps show ("instance score" without attention)
    checks: list[dict[str, Any]] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    failed_slides: dict[str, str] = field(default_factory=dict)  # slide id -> why left out
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return float(sum(self.stage_seconds.values()))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("out_dir", "index_html", "report_md"):
            out[key] = str(out[key])
        out["wall_seconds"] = self.wall_seconds
        return out

    def format(self) -> str:
        """The short summary table printed at the end of ``milkit demo``."""
        lines = [f"milkit demo: {self.model} on {self.n_slides} synthetic slides"]
        names = {
            "auc": "AUC",
            "accuracy": "accuracy",
            "balanced_accuracy": "balanced acc.",
            "f1_macro": "F1 (macro)",
        }
        head = f"  {'metric':<15}" + "".join(
            f"{'fold ' + str(m.get('fold')):>9}" for m in self.fold_metrics
        )
        lines.append(head + f"{'mean ± std':>17}")
        for key, label in names.items():
            row = f"  {label:<15}" + "".join(
                f"{format_number(m.get(key)):>9}" for m in self.fold_metrics
            )
            s = self.summary.get(key, {})
            row += f"{format_number(s.get('mean')) + ' ± ' + format_number(s.get('std')):>17}"
            lines.append(row)
        loc = self.localisation
        if loc.get("slides"):
            lines.append(
                f"  top-decile {self.score_kind} on tumour tiles: {loc['top_hit_rate']:.0%} "
                f"(chance {loc['chance']:.0%}, {loc['enrichment']:.1f}x) over "
                f"{loc['slides']} tumour slides"
            )
        if self.checks:
            verdicts = ", ".join(f"{c['test']}: {c['verdict']}" for c in self.checks)
            lines.append(f"  MIL assumption checks: {verdicts}")
        if self.failed_slides:
            left = ", ".join(self.failed_slides)
            lines.append(f"  slides left out: {left} (see bags/manifest.csv)")
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items())
        lines.append(f"  time: {self.wall_seconds:.0f}s ({timing})")
        lines.append(f"report: {self.index_html.resolve()}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- validation


def validate_options(
    n_slides: int, slide_size: int, folds: int, epochs: int, model: str, encoder: str = "fast"
) -> None:
    """Everything checkable before any work: sizes, fold count, model and encoder names."""
    from milkit import models
    from milkit.feature_extraction.encoders.registry import get_encoder_cfg

    if folds < 2:
        raise MilkitError("the demo needs at least 2 folds", value=folds, hint="Use --folds 2")
    if n_slides < 4 * folds:
        raise MilkitError(
            f"too few slides for {folds} folds (each test fold needs tumour and normal slides, "
            "and each training part an inner validation set)",
            value=n_slides,
            hint=f"Use --slides {4 * folds} or more, or fewer --folds",
        )
    if not 1024 <= slide_size <= 65536:
        raise MilkitError(
            "slide size must be within 1024–65536 px",
            value=slide_size,
            hint=f"The default {DEFAULT_SIZE} fits the demo's time budget",
        )
    if epochs < 1:
        raise MilkitError("epochs must be at least 1", value=epochs)
    models.get_entry(model)  # UnknownNameError lists close matches
    get_encoder_cfg(encoder)  # unknown names raise with close matches


def _clear(out_dir: Path) -> None:
    """``--overwrite``: remove the demo's own stage folders (and nothing else) under OUT."""
    for name in STAGES:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
    (out_dir / "labels.csv").unlink(missing_ok=True)


# ---------------------------------------------------------------------------- stages


def make_cohort(slides_dir: Path, n_slides: int, size: int, seed: int) -> bool:
    """Stage 1: synthetic slides + labels.csv; returns True when an existing cohort was reused."""
    import pandas as pd

    from milkit.feature_extraction.synthetic import make_synthetic_cohort, masks_path_for

    params = {
        "n_slides": n_slides,
        "size": size,
        "seed": seed,
        "tumour_fraction": TUMOUR_FRACTION,
        "mpp": SLIDE_MPP,
    }
    marker = slides_dir / "cohort.json"
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = None
        if old != params:
            raise MilkitError(
                "the slides folder holds a cohort made with other settings",
                value=old,
                path=slides_dir,
                hint="Rerun with the same --slides/--size/--seed, add --overwrite, or use "
                "another --out",
            )
        labels = slides_dir / "labels.csv"
        if labels.is_file():
            try:
                table = pd.read_csv(labels)
            except (ValueError, OSError):  # damaged labels file: make the cohort again
                table = pd.DataFrame()
            paths = [slides_dir / f"{sid}.svs" for sid in table.get("slide_id", [])]
            if len(paths) == n_slides and all(
                p.is_file() and masks_path_for(p).is_file() for p in paths
            ):
                return True
    make_synthetic_cohort(
        slides_dir,
        n_slides,
        size=(size, size),
        tumour_fraction=TUMOUR_FRACTION,
        seed=seed,
        mpp=SLIDE_MPP,
    )
    atomic_write_json(marker, params)
    return False


def extract_bags(slides_dir: Path, bags_dir: Path, encoder: str, progress: bool) -> Any:
    """Stage 2: ``feature_extraction.extract.preprocess`` (complete bags are skipped)."""
    from milkit.feature_extraction.extract import ExtractConfig, preprocess

    # Reader workers cost a process start each; the demo's slides are small, so tiles are
    # read in the main process (measured faster on 2 cores).
    config = ExtractConfig(encoder=encoder, num_workers=0, progress=progress, qc=True)
    return preprocess([slides_dir], bags_dir, config)


def usable_bags(extraction: Any) -> tuple[set[str], dict[str, str]]:
    """(slide ids with a non-empty bag, {slide id: why it is left out}) of a preprocess run."""
    ok: set[str] = set()
    left_out: dict[str, str] = {}
    for r in extraction.results:
        if r.status == "failed":
            left_out[r.slide_id] = r.error or "failed"
        elif r.n_tiles == 0:
            left_out[r.slide_id] = "no tissue tiles found (empty bag)"
        else:
            ok.add(r.slide_id)
    return ok, dict(sorted(left_out.items()))


def training_table(slides_dir: Path, bags_dir: Path, out_csv: Path, ok_ids: set[str]) -> Any:
    """The labels of slides whose bag is complete, written to ``out_csv``; the LabelTable."""
    import pandas as pd

    from milkit.data.labels import load_labels

    cohort = pd.read_csv(slides_dir / "labels.csv")
    keep = cohort[cohort["slide_id"].astype(str).isin(ok_ids)]
    atomic_write_text(out_csv, keep[["slide_id", "label", "case_id"]].to_csv(index=False))
    return load_labels(out_csv, bags_dir)


def train_config(model: str, epochs: int, seed: int, max_instances: int | None, progress: bool):
    """The demo's training recipe: milkit defaults with a short schedule and early stopping."""
    from milkit.training.config import TrainConfig

    return TrainConfig.for_model(
        model,
        "default",
        epochs=epochs,
        lr=1e-3,  # a short schedule on 16-bag training sets needs a larger step than 2e-4
        patience=max(3, epochs // 3),
        min_epochs=min(epochs, 5),
        # Epoch selection (val_loss) and intra-op threads (by bag size) are milkit train's
        # defaults: the demo sets neither, so it trains the way the CLI does.
        seed=seed,
        max_instances=max_instances,
        progress=progress,
    )


def _check_existing_run(run_dir: Path, model: str, folds: int, config: Any) -> None:
    from milkit.io.runs import RUN_FILE

    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return
    try:
        old = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        old = {}
    old_cfg = old.get("train_config", {})
    new_cfg = config.to_dict()
    same = old.get("model_name") == model and old.get("folds") == folds
    same = same and all(old_cfg.get(k) == new_cfg[k] for k in new_cfg if k != "progress")
    if not same:
        raise MilkitError(
            "the run folder holds a run with other settings",
            value={
                "model": old.get("model_name"),
                "folds": old.get("folds"),
                "epochs": old_cfg.get("epochs"),
                "seed": old_cfg.get("seed"),
            },
            path=run_dir,
            hint=f"Rerun with the same --model/--folds/--epochs/--seed, delete {run_dir} to "
            "train again (slides and bags are kept), or use another --out",
        )


def train_cv(table: Any, model: str, config: Any, run_dir: Path, folds: int) -> Any:
    """Stage 3: ``milkit.training.cv.cross_validate`` (finished folds are reused); OOM → a clear hint."""
    from milkit.training.cv import cross_validate

    _check_existing_run(run_dir, model, folds, config)
    try:
        return cross_validate(table, model, config, run_dir, folds=folds, resume=True)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise MilkitError(
            f"out of memory while training {model} ({type(err).__name__})",
            path=run_dir,
            hint="Subsample big bags with --max-instances 4096 (or smaller), use a smaller "
            "model, or run on a machine with more memory; finished folds are kept on rerun",
        ) from err


def _read_check_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _flat_properties(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's one model's property results from a ``milkit check`` report.json."""
    return [
        {
            "property": r["name"],
            "claimed": r["claimed"],
            "trials": r["trials"],
            "violations": r["violations"],
            "rate": r["rate"],
            "ok": r["ok"],
            "error": r["error"],
        }
        for p in payload.get("properties", [])
        for r in p["results"]
    ]


def run_checks_stage(model: str, check_dir: Path, progress: bool) -> tuple[list, list, bool]:
    """Stage 4: lean MIL assumption tests + property checks → ``check_dir`` (as `milkit check`).

    Returns (test results, property results, reused) as plain dicts from ``report.json``.
    """
    from milkit import models
    from milkit.assumptions.properties import check_properties
    from milkit.assumptions.report import save_report
    from milkit.assumptions.runner import CheckConfig, check_overrides, run_checks

    report_json = check_dir / "report.json"
    settings = json.loads(
        json_text({"demo": True, "model": models.get_entry(model).name, **CHECK_KW})
    )
    old = _read_check_report(report_json) if report_json.is_file() else None
    if old is not None and old.get("config") == settings:
        return old["results"], _flat_properties(old), True
    cfg = CheckConfig(**CHECK_KW)
    results = run_checks([model], cfg, progress=progress)
    net = models.create(model, cfg.dim, 2, **check_overrides(model, cfg))
    props = check_properties(net, name=model, dim=cfg.dim, trials=32, seed=0).to_dict()
    save_report(results, check_dir, config=settings, properties=[props])
    payload = _read_check_report(report_json) or {}
    return payload.get("results", []), _flat_properties(payload), False


# ---------------------------------------------------------------------------- the demo


def _logger(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    return log


def run_demo(
    out_dir: str | Path,
    *,
    n_slides: int = DEFAULT_SLIDES,
    slide_size: int = DEFAULT_SIZE,
    model: str = "abmil",
    folds: int = 3,
    epochs: int = DEFAULT_EPOCHS,
    encoder: str = "fast",
    seed: int = 0,
    check: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    max_instances: int | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Synthetic cohort → bags → cross-validated model → checks → report folder.

    Args:
        out_dir: the demo folder (created; reruns reuse finished stages).
        n_slides: synthetic slides (half tumour, half normal; each its own case).
        slide_size: level-0 side of each square slide in px (0.5 µm/px).
        model: registered aggregator (``milkit models``).
        folds: k of the grouped, stratified k-fold cross-validation.
        epochs: maximum training epochs per fold (early stopping on validation loss).
        encoder: patch encoder for preprocessing (``fast`` needs no weights).
        seed: seeds the cohort, the splits and training.
        check: run the MIL assumption checks of ``model``.
        progress: stage messages and progress bars on stderr.
        overwrite: delete the demo's stage folders under ``out_dir`` first.
        max_instances: subsample training bags to this many tiles (memory).
        threads: torch intra-op threads for the whole demo, extraction included (None: torch's
            default). Training picks its threads from the bag size as ``milkit train`` does
            (``milkit.runtime.threads``: one thread for the demo's small bags, which is as fast and immune
            to oversubscription when another process loads a core; measured: 30 ms vs 764 ms per
            ABMIL step with 2 threads on a 2-core machine whose other core was busy).

    Returns a :class:`DemoResult`; ``result.format()`` is the summary the CLI prints.
    """
    validate_options(n_slides, slide_size, folds, epochs, model, encoder)
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MilkitError("--out must be a folder", path=out_dir, hint="Choose another --out")
    try:
        if overwrite:
            _clear(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MilkitError(
            f"cannot prepare the demo folder ({err.strerror or err})",
            path=out_dir,
            hint="Choose an --out folder you can write to",
        ) from err
    log = _logger(progress)
    times: dict[str, float] = {}
    reused: list[str] = []
    slides_dir, bags_dir = out_dir / "slides", out_dir / "bags"
    run_dir, check_dir = out_dir / "run", out_dir / "check"
    config = train_config(model, epochs, seed, max_instances, progress)

    t0 = time.perf_counter()
    log(f"[1/5] synthetic cohort: {n_slides} slides of {slide_size} px -> {slides_dir}")
    if make_cohort(slides_dir, n_slides, slide_size, seed):
        reused.append("slides")
        log("      reusing the existing slides")
    times["slides"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[2/5] preprocessing with the {encoder!r} encoder -> {bags_dir}")
    extraction = extract_bags(slides_dir, bags_dir, encoder, progress)
    log("      " + extraction.format().replace("\n", "\n      "))
    ok_ids, failed = usable_bags(extraction)
    if extraction.count("ok") == 0:
        reused.append("bags")
    if failed:
        log(f"      left out: {'; '.join(f'{k}: {v}' for k, v in failed.items())}")
    if len(ok_ids) < 4 * folds:
        first = next(iter(failed.items()), ("", ""))
        raise MilkitError(
            f"{len(failed)} of {n_slides} slides gave no usable bag; too few left to train "
            f"(first: {first[0]}: {first[1]})",
            path=bags_dir / "manifest.csv",
            hint="See the error column of the manifest; rerun the demo to retry failed slides, "
            "or add --overwrite to start again",
        )
    times["bags"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[3/5] {folds}-fold cross-validation of {model} -> {run_dir}")
    table = training_table(slides_dir, bags_dir, out_dir / "labels.csv", ok_ids)
    done_before = all((fold_dir(run_dir, k) / METRICS_FILE).is_file() for k in range(folds))
    cv = train_cv(table, model, config, run_dir, folds)
    if done_before:
        reused.append("run")
    times["run"] = time.perf_counter() - t0

    tests: list = []
    props: list = []
    if check:
        t0 = time.perf_counter()
        log(f"[4/5] MIL assumption checks of {model} -> {check_dir}")
        tests, props, was_reused = run_checks_stage(model, check_dir, progress)
        if was_reused:
            reused.append("check")
        times["check"] = time.perf_counter() - t0
    else:
        log("[4/5] MIL assumption checks skipped (--no-check)")

    t0 = time.perf_counter()
    log(f"[5/5] report -> {out_dir / 'report'}")
    from milkit.demo.report import build_report

    built = build_report(
        out_dir,
        table=table,
        cv=cv,
        model=model,
        tests=tests,
        properties=props,
        failed_slides=failed,
        settings={
            "slides": n_slides,
            "size": slide_size,
            "folds": folds,
            "epochs": epochs,
            "encoder": encoder,
            "seed": seed,
            "tumour_fraction": TUMOUR_FRACTION,
        },
        stage_seconds=times,
    )
    times["report"] = time.perf_counter() - t0
    result = DemoResult(
        out_dir=out_dir,
        index_html=built.index_html,
        report_md=built.report_md,
        model=model,
        n_slides=len(table),
        class_names=list(table.class_names),
        fold_metrics=list(cv.folds),
        summary=dict(cv.summary),
        localisation=dict(built.localisation),
        score_kind=built.score_kind,
        checks=tests,
        properties=props,
        failed_slides=failed,
        stage_seconds=times,
        reused=reused,
    )
    atomic_write_json(out_dir / "report" / "summary.json", result.to_dict())
    return result


__all__ = ["DemoResult", "run_demo", "validate_options"]
