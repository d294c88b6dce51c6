"""Run the MIL assumption checks (T1-T3) over the aggregator zoo; print JSON lines + a table.

Usage:
    python benchmarks/assumptions_zoo.py                      # whole registry, spec defaults
    python benchmarks/assumptions_zoo.py --seeds 1 --skip transmil,mhim-transmil --out zoo/
    python benchmarks/assumptions_zoo.py --models mambamil --out zoo/mambamil   # one model
    python benchmarks/assumptions_zoo.py --table-from zoo/    # README table of finished runs

Each finished (model, test) prints one JSON line (model, test, verdict, train/test AUC, CI,
seconds); the end prints the Markdown table (for the README) and the total wall time. The
report files (md/csv/json/png) go to --out. Numbers depend on the machine's load.

Every model trains to the check's convergence rule (``CheckConfig``: at most 40 epochs, early
stopping after 8 epochs without a better training AUC, the best epoch kept). The zoo can be run
one model per process (the models are independent; several processes share the machine) and
the README table regenerated from their ``report.json`` files with ``--table-from``. Its last
column counts the fits whose kept epoch was the last allowed one: those might have gone on
improving past the cap.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated (default: all registered)")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    parser.add_argument("--tests", default="t1,t2,t3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("assumption_checks/zoo"))
    parser.add_argument("--table-from", type=Path, nargs="+", default=None, metavar="PATH",
                        help="report.json files or folders holding them (searched recursively): "
                        "print the README table and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table_from:
        print(readme_table(args.table_from, args.epochs or 40))
        return 0

    import torch

    from milkit import models
    from milkit.assumptions.report import markdown_table, save_report
    from milkit.assumptions.runner import CheckConfig, run_checks

    names = [n for n in args.models.split(",") if n] or models.list_models()
    skip = {n for n in args.skip.split(",") if n}
    names = [n for n in names if n not in skip]
    kw = {} if args.epochs is None else {"epochs": args.epochs}
    cfg = CheckConfig(
        tests=tuple(args.tests.split(",")),
        seeds=tuple(range(args.seeds)),
        num_train=args.num_train,
        num_test=args.num_test,
        device=args.device,
        **kw,
    )

    def emit(r) -> None:
        row = {
            "model": r.model,
            "test": r.test,
            "verdict": r.verdict,
            "train_auc": r.train_auc,
            "test_auc": r.test_auc,
            "ci95": [r.ci_low, r.ci_high],
            "mil_respecting": r.mil_respecting,
            "seeds": len(r.seeds),
            "epochs": [s.epochs for s in r.seeds],
            "per_seed_test_auc": [s.test_auc for s in r.seeds],
            "seconds": round(r.wall_s, 1),
            "error": r.error,
        }
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}  # fmt: skip
        print(json.dumps(clean), flush=True)

    t0 = time.perf_counter()
    results = run_checks(names, cfg, progress=False, on_result=emit)
    wall = time.perf_counter() - t0
    save_report(results, args.out, config={"delta": cfg.delta, "seeds": list(cfg.seeds)})
    print(json.dumps({
        "summary": "assumptions_zoo",
        "models": len(names),
        "tests": list(cfg.tests),
        "seeds": len(cfg.seeds),
        "num_train": cfg.num_train,
        "wall_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }))  # fmt: skip
    print(markdown_table(results), file=sys.stderr)
    return 0


def readme_table(paths: list[Path], max_epochs: int) -> str:
    """The zoo's Markdown table from finished ``report.json`` files: one row per model (sorted
    by name), ``milkit.assumptions.report.markdown_table`` cells, plus the summed fit time and
    the fits whose kept epoch was the cap."""
    from milkit.assumptions.report import markdown_table
    from milkit.assumptions.runner import TestResult

    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("report.json"))})
    results = [TestResult.from_dict(r) for f in files for r in json.loads(f.read_text())["results"]]
    results.sort(key=lambda r: r.model)
    lines = markdown_table(results).rstrip("\n").split("\n")
    extra: dict[str, tuple[float, int, int]] = {}
    for r in results:
        wall, at_cap, fits = extra.get(r.model, (0.0, 0, 0))
        extra[r.model] = (wall + sum(s.wall_s for s in r.seeds),
                          at_cap + sum(s.epochs >= max_epochs for s in r.seeds),
                          fits + len(r.seeds))  # fmt: skip
    out = []
    for line in lines:
        if line.startswith("| model "):
            line += f" fit time | kept epoch = {max_epochs} |"
        elif line.startswith("|---"):
            line += "---|---|"
        elif line.startswith("| `"):
            wall, at_cap, fits = extra[line.split("`")[1]]
            line += f" {wall / 60:.1f} min | {at_cap} of {fits} |"
        out.append(line)
    total = sum(w for w, _, _ in extra.values())
    out.append(f"Total fit time {total / 60:.0f} min over {sum(f for _, _, f in extra.values())} "
               f"fits ({len(extra)} models).")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
