"""server/api/ is the serving root with two transports under it: grpc/ and http/ import the root, never
each other; the root imports them only where it assembles the server (serve.py, wiring.py)."""

from __future__ import annotations

import ast
from pathlib import Path

API = Path(__file__).resolve().parents[3] / "server" / "api"
ROOT = "adapterserve.server.api"
ASSEMBLY = {"serve.py", "wiring.py"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_transports_import_the_root_and_not_each_other():
    for transport, other in (("grpc", "http"), ("http", "grpc")):
        files = sorted((API / transport).glob("*.py"))
        assert len(files) > 3
        for path in files:
            wrong = {m for m in imports_of(path) if m.startswith(f"{ROOT}.{other}")}
            assert wrong == set(), f"{path.name} imports {wrong}"


def test_the_root_imports_a_transport_only_where_it_assembles_the_server():
    for path in sorted(API.glob("*.py")):
        transports = {m for m in imports_of(path) if m.startswith((f"{ROOT}.grpc", f"{ROOT}.http"))}
        if path.name not in ASSEMBLY:
            assert transports == set(), f"{path.name} imports {transports}"


def test_the_generation_path_is_transport_neutral():
    for name in ("session.py", "validation.py", "prompts.py", "response_format.py"):
        imported = imports_of(API / name)
        assert not {m for m in imported if m.startswith(("grpc", "adapterserve.v1", "fastapi"))}, name
