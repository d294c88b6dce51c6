"""The import layers of docs/architecture.md §3, read from the source with ``ast``.

``milkit.models`` and ``milkit.feature_extraction`` sit on the base layer only, and no milkit
modules import each other in a cycle. Imports inside functions may still close a cycle; each one
left is listed in ``KNOWN_FUNCTION_CYCLES`` and the test fails when one is gone, so the list only
shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ROOTS = (("milkit", "milkit"), ("models", "milkit.models"),
         ("feature_extraction", "milkit.feature_extraction"))  # fmt: skip
BASE = {"milkit", "milkit.errors", "milkit.atomic", "milkit.bags", "milkit.checkpoint",
        "milkit.device", "milkit.figures"}  # fmt: skip
LOWER = ("milkit.models", "milkit.feature_extraction")

# Cycles closed only by imports inside functions, as strongly connected components.
KNOWN_FUNCTION_CYCLES = {
    # load_checkpoint rebuilds the model by name (checkpoint -> models); official weights are
    # read with checkpoint.safe_torch_load; the registry imports its own package to fill itself.
    frozenset(
        {"milkit.checkpoint", "milkit.models", "milkit.models.official", "milkit.models.registry"}
    ),
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


def test_the_graph_sees_the_known_imports():
    # Guards the parser itself: a blind graph would pass every rule below.
    assert ("milkit.models.base", True) in {(m, t) for m, t, _ in GRAPH["milkit.models.abmil"]}
    assert "milkit.cv" in {m for m, _, _ in GRAPH["milkit.commands.train"]}
    assert ("milkit.checkpoint", False) in {(m, t) for m, t, _ in GRAPH["milkit.models.official"]}
    assert len(MODULES) > 80


def test_models_and_feature_extraction_import_only_the_base_layer():
    upward = [
        f"{name}:{line} imports {mod}"
        for name in sorted(MODULES)
        for layer in LOWER
        if _within(name, layer)
        for mod, _, line in GRAPH[name]
        if not (mod in BASE or _within(mod, layer))
    ]
    assert upward == []


def test_the_base_layer_imports_only_itself_at_module_level():
    upward = [f"{name}:{line} imports {mod}" for name in sorted(BASE)
              for mod, top, line in GRAPH[name] if top and mod not in BASE]  # fmt: skip
    assert upward == []


def test_no_import_cycle_at_module_level():
    assert _cycles(module_level_only=True) == set()


def test_function_level_cycles_are_the_known_ones():
    # A new cycle fails here; so does a known one that is gone (remove it from the list).
    assert _cycles(module_level_only=False) == KNOWN_FUNCTION_CYCLES
