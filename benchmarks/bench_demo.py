"""Time ``milkit demo`` end to end (the README's first command; budget: < 5 min on 2 CPU cores).

Runs the demo into a fresh temporary folder, then once more into the same folder (every stage
reused), and prints one JSON line per run: wall and CPU seconds, seconds per stage, the mean AUC
and the machine's load average (the numbers mean little on a loaded machine; report the load).

    python benchmarks/bench_demo.py                      # the defaults of `milkit demo`
    python benchmarks/bench_demo.py --slides 8 --size 2048 --folds 2 --epochs 4 --no-check
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    from milkit.demo.pipeline import DEFAULT_EPOCHS, DEFAULT_SIZE, DEFAULT_SLIDES, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=DEFAULT_SLIDES)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--keep", type=Path, help="run into this folder instead of a temp one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        out = args.keep or Path(tmp) / "demo"
        for attempt in ("fresh", "rerun"):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            result = run_demo(
                out,
                n_slides=args.slides,
                slide_size=args.size,
                model=args.model,
                folds=args.folds,
                epochs=args.epochs,
                check=not args.no_check,
                progress=False,
            )
            record = {
                "bench": "demo",
                "run": attempt,
                "slides": args.slides,
                "size": args.size,
                "folds": args.folds,
                "epochs": args.epochs,
                "model": args.model,
                "check": not args.no_check,
                "wall_s": round(time.perf_counter() - wall0, 2),
                "cpu_s": round(time.process_time() - cpu0, 2),  # this process only
                "stage_s": {k: round(v, 2) for k, v in result.stage_seconds.items()},
                "reused": result.reused,
                "auc_mean": result.summary.get("auc", {}).get("mean"),
                "top_decile_hit_rate": result.localisation.get("top_hit_rate"),
                "chance": result.localisation.get("chance"),
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
