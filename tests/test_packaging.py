"""The distribution lists every package, maps folders to distinctive import names, ships the files
that are not Python (the C++ kernel source) in the wheel, and keeps the client importable without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
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


def test_the_wheel_ships_every_source_file_that_is_not_python(tmp_path):
    """A wheel built from the sources holds each tracked non-Python file of the server packages (the
    paged-attention kernel's C++ is compiled from the installed copy on the first start)."""
    folders = ("server", "training", "bench")
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "clients", *folders):
        path = ROOT / item
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=ignore)
        else:
            shutil.copy2(path, src / item)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        cwd=src,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = tmp_path / "dist" / out.stdout.split()[-1]
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        f"adapterserve/{path.relative_to(ROOT)}"
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix in {".cpp", ".h", ".json", ".txt"}
    }
    assert wanted, "the kernel's C++ source is a non-Python file the server needs"
    assert wanted - shipped == set()
