"""One error type and one message shape for everything a user can get wrong.

Shape (docs/architecture.md §8): what was wrong, the offending value, the file, and what to do.
"""

from __future__ import annotations

import re
from os import PathLike
from typing import Any

_UNSET = object()
SIGNIFICANT_DIGITS = 12  # enough for any setting; drops float noise (0.1 * 3 → 0.3)


def tidy_floats(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits, so that its repr is
    what a person typed: 0.24999999999999997 (= 0.499 · 0.25 / 0.499) → 0.25.

    Recurses into dicts, lists and tuples; numpy scalars become Python numbers.
    """
    if isinstance(value, bool) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        # numpy scalar; float32/float16 carry only ~7/~3 significant digits
        digits = min(digits, {4: 7, 2: 3}.get(getattr(value, "itemsize", 8), digits))
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: tidy_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [tidy_floats(v, digits) for v in value]
    if isinstance(value, tuple):
        items = [tidy_floats(v, digits) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


class MilkitError(Exception):
    """A user-facing error; the CLI prints it without a traceback and exits with status 2.

    Args:
        what: what was wrong, e.g. ``"labels CSV has duplicated slide ids"``.
        value: the offending value (shown with ``repr``); omit when there is none.
        path: the file or folder concerned.
        hint: what the user should do about it.
    """

    def __init__(
        self,
        what: str,
        *,
        value: Any = _UNSET,
        path: str | PathLike[str] | None = None,
        hint: str | None = None,
    ) -> None:
        self.what = what
        self.value = None if value is _UNSET else value
        self.path = None if path is None else str(path)
        self.hint = hint
        parts = [what]
        if value is not _UNSET:
            parts[0] = f"{what}, got {tidy_floats(value)!r}"
        if path is not None:
            parts.append(f"(file: {path})")
        message = " ".join(parts)
        if hint:
            message = f"{message}. {hint}"
        super().__init__(message)


class UnknownNameError(MilkitError, KeyError):
    """An unknown registered name (model, ...): a MilkitError the CLI prints as one line, and a
    KeyError for code that looks names up. The message lists close matches.

    ``str()`` is the template's message, not ``KeyError``'s quoted repr.
    """

    def __str__(self) -> str:
        return Exception.__str__(self)


class ModelError(MilkitError, TypeError, ValueError):
    """An aggregator refused its arguments or its input: ``"<registered name>: <problem>"``.

    The one error template of ``milkit.models``: a MilkitError (the CLI prints one line), and a
    TypeError/ValueError for code that catches those. ``models.create`` re-raises it under the
    name the user asked for (``abmil-gated``, not the class's first name).
    """

    def __init__(
        self,
        model: str,
        problem: str,
        *,
        value: Any = _UNSET,
        path: str | PathLike[str] | None = None,
        hint: str | None = None,
    ) -> None:
        self.model, self.problem, self._raw_value = model, problem, value
        super().__init__(f"{model}: {problem}", value=value, path=path, hint=hint)

    def renamed(self, model: str) -> ModelError:
        """The same error under another model name."""
        return type(self)(model, self.problem, value=self._raw_value, path=self.path,
                          hint=self.hint)  # fmt: skip


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, without ANSI colour codes, at most ``limit`` characters.

    For quoting library errors inside a MilkitError (torch's ``weights_only`` refusal is 15
    coloured lines).
    """
    flat = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def refused_global(err: BaseException) -> str | None:
    """The global (e.g. ``posix.system``) that ``torch.load(weights_only=True)`` refused, or None.

    torch names it as ``GLOBAL module.name`` in its UnpicklingError message.
    """
    found = re.search(r"GLOBAL ([\w.]+)", one_line(str(err), limit=10_000))
    return found.group(1) if found else None
