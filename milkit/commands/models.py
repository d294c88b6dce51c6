"""``milkit models``: the registered aggregators with their one-line descriptions."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  milkit models              # every registered aggregator
  milkit models 'mhim-*'     # shell-style filter
  milkit models abmil --verbose   # + class, module and official training preset
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list registered aggregators",
        description="List the MIL aggregators usable with --model.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pattern", nargs="?", help="shell-style name filter, e.g. 'abmil*'")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show class, preset arguments and the official training preset")  # fmt: skip
    p.set_defaults(func=run_command)


def model_table(pattern: str | None = None, verbose: bool = False) -> list[str]:
    """Lines of the table: name, description (and details with ``verbose``)."""
    from milkit.models.registry import get_entry, list_models

    names = list_models(pattern)
    width = max((len(n) for n in names), default=4)
    lines = []
    for name in names:
        entry = get_entry(name)
        lines.append(f"{name:<{width}}  {entry.description}")
        if verbose:
            cls = entry.cls
            lines.append(f"{'':<{width}}    class {cls.__module__}.{cls.__qualname__}")
            if entry.preset:
                lines.append(f"{'':<{width}}    preset {entry.preset}")
            tp = getattr(cls, "training_preset", {}) or {}
            if tp:
                lines.append(f"{'':<{width}}    official training {tp}")
    return lines


def run_command(args: argparse.Namespace) -> int:
    import sys

    lines = model_table(args.pattern, args.verbose)
    if not lines:
        print(f"no registered aggregator matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
