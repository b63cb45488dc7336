"""No module of the distribution (server/, bench/, ...) uses another module's private names: nothing imported from a module of ours is
spelled with a leading underscore, and no `module._name` is read through a module imported by name. A
private module (`kinds/_linear.py`, `kernels/_triton_kernels.py`) is its package's own: its siblings may
import it, and only they."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.test_import_layers import modules

CHECKED = ("adapterserve.server", "adapterserve.bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package(module: str, mods: dict[str, tuple[Path, str]]) -> str:
    return mods[module][1] if module in mods else module.rpartition(".")[0]


def violations(name: str, tree: ast.AST, mods: dict[str, tuple[Path, str]]) -> Iterator[str]:
    """`name`'s uses of private names of other modules of ours (`mods`: module -> (file, package))."""
    own_package = _package(name, mods)
    aliases: dict[str, str] = {}  # local name -> one of our modules imported under it

    def private_module(module: str) -> bool:
        """A module of ours with a private part that `name` is not a sibling of."""
        parts = module.split(".")
        for i, part in enumerate(parts):
            if _private(part) and ".".join(parts[:i]) != own_package:
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            ours = node.module in mods
            if ours and private_module(node.module):
                yield f"{name}: from {node.module} import ..."
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in mods:  # a module imported from its package
                    if private_module(full):
                        yield f"{name}: from {node.module} import {alias.name}"
                    aliases[alias.asname or alias.name] = full
                elif ours and _private(alias.name) and node.module != name:
                    yield f"{name}: from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in mods:
                    if private_module(alias.name):
                        yield f"{name}: import {alias.name}"
                    if alias.asname:
                        aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            yield f"{name}: {aliases[node.value.id]}.{node.attr} (line {node.lineno})"


def test_no_module_of_the_server_or_the_bench_uses_another_modules_private_names():
    mods = modules()
    found = [
        line
        for name, (path, _) in sorted(mods.items())
        if any(name == p or name.startswith(p + ".") for p in CHECKED)
        for line in violations(name, ast.parse(path.read_text()), mods)
    ]
    assert found == [], "\n".join(found)


def _check(name: str, source: str) -> list[str]:
    mods = {
        "pkg.a": (Path("a.py"), "pkg"),
        "pkg.b": (Path("b.py"), "pkg"),
        "pkg._hidden": (Path("_hidden.py"), "pkg"),
        "other.c": (Path("c.py"), "other"),
    }
    return list(violations(name, ast.parse(source), mods))


def test_the_check_finds_private_imports_and_reads():
    assert _check("other.c", "from pkg.a import _secret, public") == ["other.c: from pkg.a import _secret"]
    assert _check("other.c", "from pkg import a\na._secret()\na.public()") == [
        "other.c: pkg.a._secret (line 2)"
    ]
    assert _check("other.c", "import pkg.a as m\nm._x") == ["other.c: pkg.a._x (line 2)"]
    assert _check("other.c", "from pkg import _hidden") == ["other.c: from pkg import _hidden"]
    assert _check("pkg.a", "from pkg import _hidden\n_hidden.run()") == []  # a sibling may
    assert _check("pkg.a", "from pkg.b import __all__") == []  # dunders are not private
    assert _check("pkg.a", "from outside import _thing") == []  # not one of our modules


# Private names of other libraries the server has to reach (torch's oneDNN ops, transformers' attention
# implementation field, hashlib's hash type): not ours to rename.
FOREIGN_PRIVATE = {"_linear_pointwise", "_reorder_linear_weight", "_attn_implementation", "_Hash"}


def private_members(tree: ast.AST) -> Iterator[str]:
    """`obj._name` reads of any object but `self` or `cls`: another object's private member."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and node.attr not in FOREIGN_PRIVATE
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            yield f"{ast.unparse(node)} (line {node.lineno})"


def test_no_module_of_the_server_touches_another_objects_private_members():
    """The engine step reaches the core through its public methods (run_guarded, retire_finished, ...),
    a handle is fed through `put`: an object's underscored members are its own."""
    found = [
        f"{name}: {line}"
        for name, (path, _) in sorted(modules().items())
        if name.startswith("adapterserve.server")
        for line in private_members(ast.parse(path.read_text()))
    ]
    assert found == [], "\n".join(found)


def test_the_member_check_allows_self_and_finds_the_rest():
    source = "self._a = 1\ncls._b\nother._c\nself.x._d\nmodel.config._attn_implementation\nx.__dict__"
    assert list(private_members(ast.parse(source))) == ["other._c (line 3)", "self.x._d (line 4)"]
