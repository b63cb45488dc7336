"""No import cycle between packages: if package A imports from package B (directly or through others),
B never imports from A. Imports under `if TYPE_CHECKING:` are annotations only and do not count; imports
inside functions do (they are dependencies all the same, only deferred)."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = "v1"  # protobuf stubs (clients/python/adapterserve/v1)


def modules() -> dict[str, tuple[Path, str]]:
    """module name -> (file, the package it belongs to)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: dict[str, tuple[Path, str]] = {}
    for import_root, folder in dirs.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if GENERATED in parts[:-1] or "__pycache__" in parts:
                continue
            is_init = parts[-1] == "__init__"
            name = ".".join([import_root, *(parts[:-1] if is_init else parts)])
            package = name if is_init else name.rpartition(".")[0]
            if not (path.parent / "__init__.py").exists():
                continue  # a script folder, not a package
            found[name] = (path, package)
    return found


def _runtime_imports(tree: ast.AST) -> Iterator[str]:
    """Names imported by absolute imports outside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for stmt in node.orelse for n in _runtime_imports(ast.Module([stmt], [])))
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        else:
            yield from _runtime_imports(node)


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> package it imports -> the module-level imports that make the edge."""
    mods = modules()
    graph: dict[str, dict[str, set[str]]] = {}
    for name, (path, package) in mods.items():
        for target in _runtime_imports(ast.parse(path.read_text())):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if not target:
                continue
            other = mods[target][1]
            nested = other.startswith(package + ".") or package.startswith(other + ".")
            if other != package and not nested:  # a package and its subpackages are one unit
                graph.setdefault(package, {}).setdefault(other, set()).add(f"{name} -> {target}")
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert graph  # the scan found the packages
    report = [
        f"{a} -> {b}: {sorted(graph[a][b])}"
        for component in cycles(graph)
        for a in component
        for b in component
        if b in graph.get(a, {})
    ]
    assert report == [], "\n".join(report)


def test_the_engine_never_imports_the_store():
    assert "adapterserve.server.store" not in package_graph().get("adapterserve.server.engine", {})


def test_cpu_control_imports_no_other_server_package():
    """server/cpu/ is a leaf: the engine, model, adapters, store and API import it, it imports none of them
    (only the server's top-level settings and errors)."""
    graph = package_graph()
    assert graph.get("adapterserve.server.cpu", {}) == {}
    users = {package for package, edges in graph.items() if "adapterserve.server.cpu" in edges}
    assert {"adapterserve.server.engine", "adapterserve.server.adapters"} <= users


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}) == [
        ["a", "b", "c"]
    ]


def test_the_architecture_module_map_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Parts and their contracts") :]
    module_map = section[section.index("```") + 3 :]
    module_map = module_map[: module_map.index("```")]
    listed = set(re.findall(r"[\w.]+\.py\b", module_map))  # whole names: "linear.py" is not "_linear.py"
    missing = sorted(
        str(path.relative_to(ROOT))
        for name, (path, _) in modules().items()
        if path.name != "__init__.py" and path.name not in listed
    )
    assert missing == [], f"add to docs/architecture.md's module map: {missing}"
