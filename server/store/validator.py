"""What the store is given to check an adapter folder with (`AdapterValidator`), and what that returns.

The store never imports the loader: the server hands it a validator, which uploads run before a
publish (upload.py) and loads run on a served folder (lookup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from adapterserve.server.adapters.types import AdapterInfo


class ValidatedAdapter(Protocol):
    """What the injected validator returns (the loader's LoadedAdapter satisfies it)."""

    @property
    def info(self) -> AdapterInfo: ...

    @property
    def nbytes(self) -> int: ...


# Loads and validates an adapter folder against the served base (shapes, caps, fingerprint), raising
# AdapterValidationError / UnsupportedAdapterError / BaseMismatchError. In the server this is
# functools.partial(load_adapter_dir, spec=base.spec, settings=settings.engine).
AdapterValidator = Callable[[Path], ValidatedAdapter]
