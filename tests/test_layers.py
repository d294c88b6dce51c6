"""The import layers of docs/architecture.md §3, read from the source with ``ast``.

Every module belongs to one layer of ``LAYERS`` and imports only its own layer and those below,
at module level and inside functions alike: ``milkit.models`` and ``milkit.feature_extraction``
use only the base (``milkit.errors``, ``milkit.io``, ``milkit.runtime``). No modules import each
other in a cycle at module level. Imports inside functions may still close a cycle within a
package; each one left is listed in ``KNOWN_FUNCTION_CYCLES`` and the test fails when one is
gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ROOTS = (("milkit", "milkit"), ("models", "milkit.models"),
         ("feature_extraction", "milkit.feature_extraction"))  # fmt: skip
# The layers, lowest first (docs/architecture.md §3). A module may import its own layer and the
# layers below it; ``milkit`` itself (the package root: version, MilkitError) counts as base.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("milkit.errors", "milkit.io", "milkit.runtime"),  # base: files, errors, compute settings
    ("milkit.models", "milkit.feature_extraction"),  # aggregators; slides -> bags
    ("milkit.data",),  # labels, datasets, batching, splits, provenance
    ("milkit.training",),  # config, trainer, metrics, cross-validation, inference
    ("milkit.evaluation", "milkit.assumptions", "milkit.interop"),  # after training
    ("milkit.demo",),  # the demo pipeline and its report
    ("milkit.commands", "milkit.cli", "milkit.__main__"),  # argparse + one library call each
)
BASE = LAYERS[0]
LOWER = LAYERS[1]

# Cycles closed only by imports inside functions, as strongly connected components.
KNOWN_FUNCTION_CYCLES = {
    # the registry imports its own package to fill itself (every model module registers itself);
    # load_official builds the milkit model by its registered name
    frozenset({"milkit.models", "milkit.models.official", "milkit.models.registry"}),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Installed module name -> (file, is a package ``__init__``), as tests/test_namespace.py."""
    out = {}
    for root, prefix in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO / root).with_suffix("").parts
            is_pkg = parts[-1] == "__init__"
            out[".".join((prefix, *(parts[:-1] if is_pkg else parts)))] = (path, is_pkg)
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported milkit module, imported at module level, line) for every import in ``name``.

    Imports under ``if TYPE_CHECKING:`` and inside functions are not module-level.
    """
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    mod = ".".join([*up, *([mod] if mod else [])])
                for a in child.names:  # `from milkit import models` imports a module
                    sub = f"{mod}.{a.name}"
                    found.append((sub if sub in MODULES else mod, top, child.lineno))
            visit(child, top)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    out = []
    for mod, top, line in found:
        while mod and mod not in MODULES:  # `import milkit.x.func`-style: the nearest module
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.append((mod, top, line))
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _cycles(module_level_only: bool) -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = {n: sorted({m for m, top, _ in GRAPH[n] if top or not module_level_only})
             for n in MODULES}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: set[frozenset[str]] = set()

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(MODULES):
        if v not in index:
            connect(v)
    return out


def _layer(name: str) -> int:
    if name == "milkit":
        return 0
    for rank, packages in enumerate(LAYERS):
        if any(_within(name, p) for p in packages):
            return rank
    raise AssertionError(f"{name} is in no layer: add its package to LAYERS")


def test_the_graph_sees_the_known_imports():
    # Guards the parser itself: a blind graph would pass every rule below.
    assert ("milkit.models.base", True) in {(m, t) for m, t, _ in GRAPH["milkit.models.abmil"]}
    assert "milkit.training.cv" in {m for m, _, _ in GRAPH["milkit.commands.train"]}
    assert ("milkit.io.checkpoint", False) in {
        (m, t) for m, t, _ in GRAPH["milkit.models.official"]
    }
    assert len(MODULES) > 80


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_a_higher_layer():
    # Inside functions too: a lazy import is still a dependency.
    upward = [
        f"{name}:{line} imports {mod}"
        for name in sorted(MODULES)
        for mod, _, line in GRAPH[name]
        if _layer(mod) > _layer(name)
    ]
    assert upward == []


def test_models_and_feature_extraction_do_not_import_each_other():
    models, extraction = LOWER
    crossing = [
        f"{name}:{line} imports {mod}"
        for name in sorted(MODULES)
        for mod, _, line in GRAPH[name]
        if (_within(name, models) and _within(mod, extraction))
        or (_within(name, extraction) and _within(mod, models))
    ]
    assert crossing == []


def test_no_import_cycle_at_module_level():
    assert _cycles(module_level_only=True) == set()


def test_function_level_cycles_are_the_known_ones():
    # A new cycle fails here; so does a known one that is gone (remove it from the list).
    assert _cycles(module_level_only=False) == KNOWN_FUNCTION_CYCLES
