"""One error type and one message shape for everything a user can get wrong.

Shape (DESIGN §8): what was wrong, the offending value, the file, and what to do.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

_UNSET = object()


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
            parts[0] = f"{what}, got {value!r}"
        if path is not None:
            parts.append(f"(file: {path})")
        message = " ".join(parts)
        if hint:
            message = f"{message}. {hint}"
        super().__init__(message)
