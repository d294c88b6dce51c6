"""``milkit check``: MIL assumption tests (Raff & Holt, NeurIPS 2023) for registered aggregators."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  milkit check --model abmil                       # T1-T3, 3 seeds, report in ./assumption_checks
  milkit check --model mi-net --model threshold-mil --tests t2,t3 --seeds 5 --out checks/
  milkit check --all --out checks/zoo              # every registered aggregator

Tests: t1 single-concept standard MIL with a poison shortcut; t2 threshold MIL (A and B) with
a poison shortcut; t3 false-frequency reliance. Each model is trained (milkit's trainer) on the
training draw and scored on a shifted, fresh test draw. Verdicts: PASS; FAIL = learned the
MIL-violating shortcut (mean test AUC < 0.5 - delta, or the 95% CI below 0.5); DID NOT LEARN =
training AUC below --train-auc. Writes OUT/report.{md,csv,json,png}. Exit status 1 when a model
marked mil_respecting FAILS (or breaks a property it claims), or a model crashed.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="MIL assumption tests (algorithmic unit tests) for aggregators",
        description="Train aggregators on synthetic MIL tasks whose training data contain a "
        "MIL-violating shortcut and report whether they learned it.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_argument_group("models")
    which.add_argument("--model", action="append", default=[], metavar="NAME",
                       help="registered aggregator; repeatable or comma-separated")  # fmt: skip
    which.add_argument("--all", action="store_true", help="every registered aggregator")
    which.add_argument("--no-small", action="store_true",
                       help="keep the models' default layer widths (default: shrink to 64)")  # fmt: skip
    tests = p.add_argument_group("tests")
    tests.add_argument("--tests", default="t1,t2,t3", help="comma-separated (default t1,t2,t3)")
    tests.add_argument("--seeds", type=int, default=3, help="number of seeds 0..n-1 (default 3)")
    tests.add_argument("--num-train", type=int, default=400, help="training bags (default 400)")
    tests.add_argument("--num-test", type=int, default=400, help="test bags (default 400)")
    tests.add_argument("--dim", type=int, default=16, help="feature dimension D (default 16)")
    tests.add_argument("--epochs", type=int, default=None, help="max epochs (default 40)")
    tests.add_argument("--patience", type=int, default=None,
                     help="early stopping on the training AUC (default 8)")  # fmt: skip
    tests.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3)")
    tests.add_argument("--train-auc", type=float, default=0.9,
                     help="below this mean training AUC: DID NOT LEARN (default 0.9)")  # fmt: skip
    tests.add_argument("--delta", type=float, default=0.1,
                     help="FAIL when mean test AUC < 0.5 - delta (default 0.1)")  # fmt: skip
    tests.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    tests.add_argument("--no-properties", action="store_true",
                     help="skip the untrained permutation/padding/monotonicity checks")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("assumption_checks"),
                   help="report folder (default ./assumption_checks)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the up-front time estimate (one 2-epoch calibration fit per model)")  # fmt: skip
    p.set_defaults(func=run)


def _model_names(args: argparse.Namespace) -> list[str]:
    from milkit.errors import MilkitError
    from milkit.models.registry import get_entry, list_models

    names = [n.strip() for item in args.model for n in item.split(",") if n.strip()]
    if args.all:
        names = list_models() + [n for n in names if n not in list_models()]
    if not names:
        raise MilkitError(
            "no model to check", hint="Pass --model NAME (see `milkit models`) or --all"
        )
    out = []
    for n in names:
        out.append(get_entry(n).name)  # UnknownNameError lists close matches
    return list(dict.fromkeys(out))


def _config(args: argparse.Namespace) -> Any:
    from milkit.assumptions.runner import CheckConfig

    kw: dict[str, Any] = {}
    for key in ("epochs", "patience", "lr"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.seeds < 1:
        from milkit.errors import MilkitError

        raise MilkitError("--seeds must be >= 1", value=args.seeds)
    return CheckConfig(
        tests=tuple(t for t in args.tests.split(",") if t.strip()),
        seeds=tuple(range(args.seeds)),
        num_train=args.num_train,
        num_test=args.num_test,
        dim=args.dim,
        train_auc_threshold=args.train_auc,
        delta=args.delta,
        device=args.device,
        small=not args.no_small,
        **kw,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_message(names: list[str], cfg: Any) -> str:
    """What the run will do and about how long it takes, said before it starts.

    The time is an upper estimate from one short calibration fit per model
    (``estimate_fit_seconds``); a model whose calibration crashes is named and not counted.
    """
    from milkit.assumptions.runner import estimate_fit_seconds

    per_model = len(cfg.tests) * len(cfg.seeds)
    fits = len(names) * per_model
    head = (
        f"milkit check: {len(names)} model(s) × {len(cfg.tests)} test(s) × {len(cfg.seeds)} "
        f"seed(s) = {fits} fits of ≤ {cfg.epochs} epochs on {cfg.num_train} bags"
    )
    each, failed = {}, []
    for name in names:
        try:
            each[name] = estimate_fit_seconds(name, cfg) * per_model
        except Exception:  # the real run reports the crash with its message
            failed.append(name)
    total = sum(each.values())
    slowest = sorted(each.items(), key=lambda kv: -kv[1])[:3]
    detail = ", ".join(f"{n} {_duration(t)}" for n, t in slowest)
    text = (
        f"{head}; about {_duration(total)} at most ({detail}; early stopping usually ends sooner)"
    )
    if failed:
        text += f"; no estimate for {', '.join(failed)} (calibration failed)"
    return text


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from milkit.assumptions.properties import check_properties
    from milkit.assumptions.report import save_report, text_table
    from milkit.assumptions.runner import ERROR, FAIL, check_overrides, run_checks
    from milkit.models.registry import create

    names = _model_names(args)
    cfg = _config(args)
    properties = []
    if not args.no_properties:
        for name in names:
            try:
                model = create(name, cfg.dim, 2, **check_overrides(name, cfg))
                properties.append(check_properties(model, name=name, seed=0).to_dict())
            except Exception as err:  # a model that cannot even be built is reported, not fatal
                print(f"milkit check: {name}: property checks skipped: {err}", file=sys.stderr)
    if not args.no_estimate:
        print(plan_message(names, cfg), file=sys.stderr, flush=True)
    results = run_checks(names, cfg, progress=not args.quiet)
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
    }
    paths = save_report(results, args.out, config=config, properties=properties)
    print(text_table(results), end="")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    bad = [r for r in results if r.mil_respecting and r.verdict == FAIL]
    broken = [
        (p["model"], r["name"])
        for p in properties
        for r in p["results"]
        if not r["ok"] and r["claimed"] and not r["error"]
    ]
    errors = [r for r in results if r.verdict == ERROR]
    for r in bad:
        print(f"FAIL: {r.model} is marked mil_respecting but failed {r.test}", file=sys.stderr)
    for model, prop in broken:
        print(f"FAIL: {model} claims {prop} but violates it", file=sys.stderr)
    for r in errors:
        print(f"ERROR: {r.model} {r.test}: {r.error}", file=sys.stderr)
    return 1 if (bad or broken or errors) else 0
