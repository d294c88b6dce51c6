"""Atomic file writes and per-slide locks: a killed process never leaves a file that looks
complete, and two workers never write the same bag.

Write to ``<name>.partial``, fsync, then ``os.replace`` onto the final name and fsync the folder.
A lock is an ``O_CREAT | O_EXCL`` file holding host and pid; a lock whose process is gone (same
host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milkit.errors import MilkitError

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name used while ``path`` is being written."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        _fsync_file(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(value: Any) -> str:
    """``value`` as the JSON text milkit writes (run.json, metrics.json, summary.json, ...):
    indented by 2, newline-terminated; numpy/torch scalars become numbers, paths strings, and
    NaN stays ``NaN`` (as Python's json module reads and writes it)."""
    return json.dumps(value, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write :func:`json_text` of ``value`` to ``path`` atomically."""
    atomic_write_text(path, json_text(value))


# ---------------------------------------------------------------------------- slide locks


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path: Path) -> bool:
    """Create ``path`` with O_CREAT|O_EXCL holding pid/host/time; clear a dead pid's lock.

    Returns False while another live process holds it (or a process on another host).
    """
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _clear_if_stale(path):
                return False
            continue
        with os.fdopen(fd, "w") as fh:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
            fh.write(json.dumps(info))
        return True
    return False


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clear_if_stale(path: Path) -> bool:
    info = read_lock(path)
    if info is None:
        # Being written right now, or garbage: garbage older than a minute is stale.
        try:
            if time.time() - path.stat().st_mtime < 60:
                return False
        except FileNotFoundError:
            return True
    elif info.get("host") != socket.gethostname() or pid_alive(int(info.get("pid", -1))):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def release_lock(path: Path) -> None:
    info = read_lock(path)
    if info is not None and info.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def waiting_lock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    while not acquire_lock(path):
        if time.monotonic() > deadline:
            raise MilkitError(
                "timed out waiting for a lock",
                path=path,
                hint="Another preprocess run holds it; delete the file if no run is active",
            )
        time.sleep(0.05)
    try:
        yield
    finally:
        release_lock(path)
