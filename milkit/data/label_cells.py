"""Normalising the cells of a labels table: class labels and slide ids.

A labels CSV passes through spreadsheets and pandas round trips, which rewrite ``1`` as ``1.0``
and missing values as ``nan``/``NA``. These helpers make labels that mean the same compare equal
(numbers as numbers), recognise the usual missing-value spellings, find class names that differ
only by case or spaces (refused by ``load_labels``: which one is right is the user's call), and
strip slide-file extensions from ids (``S01.svs`` names the bag ``S01.h5``).
"""

from __future__ import annotations

import math

from milkit.io.bags import BAG_SUFFIXES

# Cells read as "no label" (compared case-insensitively, after stripping spaces): pandas' and
# R's NA spellings, Python's None, JSON's null, Excel's #N/A.
MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "none", "null", "<na>", "#n/a", "-nan"})


def is_missing_label(raw: str) -> bool:
    """True when ``raw`` spells a missing value (``NA``, ``N/A``, ``nan``, ``None``, ``null``,
    empty or only whitespace)."""
    return raw.strip().lower() in MISSING_LABELS


def numeric_value(raw: str) -> float | None:
    """The finite number ``raw`` spells (``1``, ``1.0``, `` 01``, ``1e0``), else None."""
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def canonical_label(raw: str) -> str | None:
    """The class name of a label cell, or None when it is missing.

    Numbers compare as numbers and are written readably: ``1``, ``1.0`` and ``01`` are all
    class ``"1"``; ``0.5`` stays ``"0.5"``. Text labels are kept as written (minus surrounding
    spaces); case and inner spaces are not changed here — see ``label_key``.
    """
    if is_missing_label(raw):
        return None
    value = numeric_value(raw)
    if value is None:
        return raw.strip()
    if value == int(value):
        return str(int(value))
    return repr(value)


def label_key(name: str) -> str:
    """What two class names must share to be one class to a human: case and spaces dropped."""
    return "".join(name.split()).casefold()


def class_sort_key(name: str) -> tuple[int, float, str]:
    """Numeric class names in numeric order (``2`` before ``10``), then text names."""
    value = numeric_value(name)
    return (0, value, "") if value is not None else (1, 0.0, name)


def slide_file_extensions() -> tuple[str, ...]:
    """Extensions that may end a slide id by mistake: the slide formats preprocessing reads
    (``milkit.feature_extraction.batch.SLIDE_EXTENSIONS``, the one list) plus the bag
    suffixes, longest first."""
    from milkit.feature_extraction.batch import SLIDE_EXTENSIONS

    exts = {e.lower() for e in (*SLIDE_EXTENSIONS, *BAG_SUFFIXES, ".ome.tif", ".ome.tiff")}
    return tuple(sorted(exts, key=len, reverse=True))


def strip_slide_extension(slide_id: str) -> str | None:
    """``S01`` for ``S01.svs`` / ``S01.ome.tiff`` / ``S01.h5`` (case-insensitive); None when the
    id ends with no known slide or bag extension. Preprocessing names a slide's bag after the
    file's stem, so this is the id its bag carries."""
    lower = slide_id.lower()
    for ext in slide_file_extensions():
        if lower.endswith(ext) and len(slide_id) > len(ext):
            return slide_id[: -len(ext)]
    return None


__all__ = [
    "MISSING_LABELS",
    "canonical_label",
    "class_sort_key",
    "is_missing_label",
    "label_key",
    "numeric_value",
    "slide_file_extensions",
    "strip_slide_extension",
]
