"""Each tuned constant of CPU control is defined once in server/cpu/ and listed in docs/cpu.md's table
(what it trades, how it was chosen); the C++ kernel's constexpr constants too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CPU = ROOT / "server" / "cpu"
PUBLIC_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _numeric(node: ast.AST) -> bool:
    """A number, or arithmetic and tuples of numbers and other constants."""
    return all(
        isinstance(
            n, ast.Constant | ast.BinOp | ast.UnaryOp | ast.operator | ast.unaryop | ast.Tuple | ast.Load
        )
        or (isinstance(n, ast.Name) and PUBLIC_CONSTANT.match(n.id))
        for n in ast.walk(node)
    ) and any(isinstance(n, ast.Constant) and isinstance(n.value, int | float) for n in ast.walk(node))


def python_constants() -> list[tuple[str, str]]:
    """(module, NAME) for each module-level numeric constant assignment in server/cpu/."""
    found = []
    for path in sorted(CPU.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            if names and all(PUBLIC_CONSTANT.match(n) for n in names) and _numeric(node.value):
                found += [(path.stem, name) for name in names]
    return found


def cpp_constants() -> list[str]:
    return re.findall(r"^constexpr\s+\w+\s+(\w+)\s*=", (CPU / "paged_attention.cpp").read_text(), re.M)


def test_each_constant_is_defined_once():
    names = [name for _, name in python_constants()]
    assert "NEW_LOAD_IDLE_S" in names and "CONTENDED" in names  # the scan finds the governor's
    twice = sorted({name for name in names if names.count(name) > 1})
    assert twice == [], f"defined in more than one module of server/cpu/: {twice}"


def test_every_constant_is_in_the_docs_table():
    table = (ROOT / "docs" / "cpu.md").read_text().split("## Tuned constants", 1)[1]
    missing = [f"{module}.{name}" for module, name in python_constants() if f"`{module}.{name}`" not in table]
    missing += [name for name in cpp_constants() if f"`{name}`" not in table]
    assert missing == [], f"add to docs/cpu.md's 'Tuned constants': {missing}"
