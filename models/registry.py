"""Aggregator registry: ``register_aggregator``, ``create``, ``list_models`` (timm-style).

Names are lowercase and hyphenated; ``_`` is accepted. A name may be registered several times on
the same class with different preset keyword arguments (e.g. ``abmil`` and ``abmil-gated``).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from milkit.errors import ModelError, UnknownNameError

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


def check_overrides(name: str, overrides: Mapping[str, Any] | None = None) -> ModelEntry:
    """The entry of ``name`` once its override names are known to be accepted (no model built).

    What a command checks before any slow work (reading labels, scanning bags); the values are
    checked when the model is built.

    Raises:
        milkit.errors.UnknownNameError: unknown name (close matches listed).
        milkit.errors.ModelError: an override the model does not accept (accepted ones listed).
    """
    entry = get_entry(name)
    accepted = accepted_parameters(entry.cls)
    unknown = sorted(set(overrides or {}) - set(accepted))
    if unknown:
        raise ModelError(entry.name, f"unknown parameter(s) {unknown}",
                         hint=f"accepted parameters: {accepted}")  # fmt: skip
    return entry


def create(name: str, in_dim: int, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered aggregator; overrides replace the preset's keyword arguments.

    Raises:
        milkit.errors.UnknownNameError: unknown name (a MilkitError and a KeyError; the message
            lists close matches).
        milkit.errors.ModelError: an override the model does not accept (the hint lists the
            accepted ones), num_classes < 2, or an argument value the model refuses; the
            message starts with the registered name (a MilkitError, TypeError and ValueError).
    """
    entry = check_overrides(name, overrides)
    if int(num_classes) < 2:
        raise ModelError(entry.name, "num_classes must be >= 2 (binary tasks use 2)",
                         value=num_classes)  # fmt: skip
    kwargs = {**entry.preset, **overrides}
    try:
        model = entry.cls(int(in_dim), int(num_classes), **kwargs)
    except ModelError as err:  # said under the name the user asked for (abmil-gated, not abmil)
        if err.model == entry.name:
            raise
        raise err.renamed(entry.name) from None
    model.model_name = entry.name  # forward-time errors name it too
    return model


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
