"""Aggregator registry: ``register_aggregator``, ``create``, ``list_models`` (timm-style).

Names are lowercase and hyphenated; ``_`` is accepted. A name may be registered several times on
the same class with different preset keyword arguments (e.g. ``abmil`` and ``abmil-gated``).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from milkit.errors import UnknownNameError

T = TypeVar("T", bound=type[nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """One registered name: the class and the preset keyword arguments it is built with."""

    name: str
    cls: type[nn.Module]
    preset: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_aggregator(name: str, description: str = "", **preset: Any) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``name`` with optional preset arguments."""
    key = normalise_name(name)

    def decorator(cls: T) -> T:
        if key in _REGISTRY and _REGISTRY[key].cls is not cls:
            raise ValueError(f"aggregator name {key!r} is already registered")
        accepted = accepted_parameters(cls)
        unknown = sorted(set(preset) - set(accepted))
        if unknown:
            raise TypeError(f"preset for {key!r} has unknown parameters {unknown}")
        doc = description or (inspect.getdoc(cls) or "").split("\n", 1)[0]
        _REGISTRY[key] = ModelEntry(key, cls, dict(preset), doc)
        return cls

    return decorator


def accepted_parameters(cls: type) -> list[str]:
    """Keyword parameters of ``cls.__init__`` other than ``in_dim`` and ``num_classes``."""
    params = inspect.signature(cls.__init__).parameters
    return [
        p
        for p, spec in params.items()
        if p not in ("self", "in_dim", "num_classes")
        and spec.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names list close matches."""
    _ensure_loaded()
    key = normalise_name(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f"Did you mean: {', '.join(close)}? " if close else ""
        raise UnknownNameError(
            "unknown aggregator",
            value=name,
            hint=f"{hint}Run `milkit models` to list all {len(_REGISTRY)} registered names",
        )
    return _REGISTRY[key]


def create(name: str, in_dim: int, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered aggregator; overrides replace the preset's keyword arguments.

    Raises:
        milkit.errors.UnknownNameError: unknown name (a MilkitError and a KeyError; the message
            lists close matches).
        TypeError: an override the model does not accept (message lists accepted ones).
    """
    entry = get_entry(name)
    accepted = accepted_parameters(entry.cls)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise TypeError(
            f"{entry.name}: unknown parameter(s) {unknown}; accepted parameters: {accepted}"
        )
    if int(num_classes) < 2:
        raise ValueError(
            f"{entry.name}: num_classes must be >= 2 (binary tasks use 2), got {num_classes}"
        )
    kwargs = {**entry.preset, **overrides}
    return entry.cls(int(in_dim), int(num_classes), **kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern (``mhim-*``)."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if pattern:
        pat = normalise_name(pattern)
        names = [n for n in names if fnmatch.fnmatch(n, pat)]
    return names


def _ensure_loaded() -> None:
    from milkit import models  # noqa: F401  # importing the package registers every model module
