"""No import cycle between the modules of the server: if module A imports module B (directly or through
others), B never imports A. Every import counts wherever it is written: at module level, inside a
function (deferred, a dependency all the same) and under `if TYPE_CHECKING:` (the types of one module are
part of what it needs). `from pkg import name` imports `pkg` and, when `pkg.name` is a module, that module
too; a package's `__init__` is a module of its own.

Code two modules both need belongs in a third that imports neither (a shared leaf module, an interface
the other side registers into, a callable passed in), not behind an import hidden in a string."""

from __future__ import annotations

import ast

from tests.test_import_layers import cycles, modules

SERVER = "adapterserve.server"

Graph = dict[str, dict[str, set[str]]]


def imported_modules(name: str, tree: ast.AST, known: set[str]) -> dict[str, set[str]]:
    """The modules of `known` that module `name` imports anywhere in `tree` -> where ("line N")."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} line {node.lineno}: a relative import (write it absolute)"
            targets = [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.setdefault(target, set()).add(f"line {node.lineno}")
    return found


def import_graph(sources: dict[str, str]) -> Graph:
    """module -> module it imports -> the lines that import it, over the modules `sources` names (module
    name -> its source)."""
    known = set(sources)
    return {name: imported_modules(name, ast.parse(source), known) for name, source in sources.items()}


def server_sources() -> dict[str, str]:
    return {
        name: path.read_text()
        for name, (path, _) in modules().items()
        if name == SERVER or name.startswith(SERVER + ".")
    }


def describe(component: list[str], graph: Graph) -> str:
    """One cycle, each of its import edges with the lines that make it."""
    edges = [
        f"  {a} -> {b} ({', '.join(sorted(graph[a][b]))})"
        for a in component
        for b in component
        if b in graph.get(a, {})
    ]
    return "\n".join([f"cycle of {len(component)} modules:", *edges])


def test_no_import_cycle_inside_the_server():
    graph = import_graph(server_sources())
    assert len(graph) > 100  # the scan found the server's modules
    found = cycles(graph)
    for component in found:
        print(describe(component, graph))
    assert found == [], "\n".join(describe(component, graph) for component in found)


def test_the_scan_finds_a_cycle_through_any_kind_of_import():
    sources = {
        "pkg": "from pkg.a import thing\n",
        "pkg.a": "from pkg import b\nthing = 1\n",  # a module imported from its package
        "pkg.b": "def f():\n    import pkg.c\n",  # inside a function
        "pkg.c": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import thing\n"
        ),  # an annotation's import
        "pkg.d": "import pkg.a\nimport os\n",  # imports into the cycle, not part of it
    }
    graph = import_graph(sources)
    assert graph["pkg.a"] == {"pkg": {"line 1"}, "pkg.b": {"line 1"}}
    found = cycles(graph)
    assert found == [["pkg", "pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.c -> pkg.a (line 3)" in describe(found[0], graph)


def test_a_graph_without_cycle_has_none():
    graph = import_graph({"x": "import y\n", "y": "import z\n", "z": "import os\n"})
    assert cycles(graph) == []
