"""What a store folder holds, for assertions: its entries besides the version records, and the records."""

from __future__ import annotations

import os
from pathlib import Path

from adapterserve.server.store.layout import VERSIONS_DIR


def entries(root: Path) -> list[str]:
    """Sorted names in `root`, the version-record folder left out (it is kept on purpose)."""
    return sorted(n for n in os.listdir(root) if n != VERSIONS_DIR)


def records(root: Path) -> dict[str, int]:
    """name -> recorded highest version ({} before the first write). Fails on a leftover temp file."""
    folder = root / VERSIONS_DIR
    if not folder.exists():
        return {}
    names = os.listdir(folder)
    assert not [n for n in names if n.startswith(".")], f"leftover record writes: {names}"
    return {n: int((folder / n).read_text()) for n in names}
