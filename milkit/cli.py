"""The ``milkit`` command: a thin dispatcher over ``milkit.commands.*``.

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func=run``; modules import heavy libraries (torch, openslide) inside ``run`` only, so that
``milkit --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Order shown in `milkit --help`.
COMMAND_MODULES = (
    "preprocess",
    "info",
    "train",
    "evaluate",
    "predict",
    "heatmap",
    "report",
    "export",
    "check",
    "models",
    "demo",
    "import_weights",
)


def build_parser() -> argparse.ArgumentParser:
    from milkit import __version__

    parser = argparse.ArgumentParser(
        prog="milkit",
        description="Multiple-instance learning for computational pathology.",
    )
    parser.add_argument("--version", action="version", version=f"milkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"milkit.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"milkit.commands.{name}":
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from milkit.errors import MilkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # `milkit info BAG | head`: the reader left; stop quietly, like any Unix filter.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter cut short
    except MilkitError as err:
        print(f"milkit {args.command}: error: {err}", file=sys.stderr)
        from milkit.runtime.oom import BagOutOfMemoryError

        return 3 if isinstance(err, BagOutOfMemoryError) else 2  # 3: out of memory, as below
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        from milkit.runtime.oom import is_out_of_memory

        if not is_out_of_memory(err):
            raise
        print(
            f"milkit {args.command}: error: out of memory ({str(err).splitlines()[0][:200]}). "
            "Subsample large bags with --max-instances N, use --batch-size 1, or run on a "
            "machine/GPU with more memory; finished work (bags, checkpoints) is kept and "
            "reruns resume.",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        print(f"milkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
