"""The distribution lists every package, maps folders to distinctive import names, and keeps the
client importable without torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for import_root, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([import_root, *rel.parts]) if rel.parts else import_root)
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert all(name.startswith("adapterserve") for name in listed)


def test_client_package_imports_without_torch():
    code = (
        "import sys, adapterserve\n"
        "assert 'torch' not in sys.modules, 'importing the SDK pulled torch'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
