"""Where the engine gets adapters from: the store's host cache in the server, a dict offline."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Protocol

from adapterserve.server.adapters.loader import LoadedAdapter, load_adapter_dir
from adapterserve.server.errors import NotFoundError
from adapterserve.server.model.spec import BaseModelSpec
from adapterserve.server.settings import EngineSettings
from adapterserve.server.store.registry import ResolvedAdapter

__all__ = ["AdapterProvider", "ResolvedAdapter", "StaticAdapterProvider"]


class AdapterProvider(Protocol):
    async def get(self, name: str) -> ResolvedAdapter:
        """The current version of `name`; raises NotFoundError for an unknown name."""
        ...


class StaticAdapterProvider:
    """Adapters registered in memory (offline engine, tests, benchmarks)."""

    def __init__(self, spec: BaseModelSpec, settings: EngineSettings):
        self.spec, self.settings = spec, settings
        self._adapters: dict[str, ResolvedAdapter] = {}
        self._versions = itertools.count(1)

    def add(self, name: str, source: Path | LoadedAdapter) -> ResolvedAdapter:
        adapter = (
            source
            if isinstance(source, LoadedAdapter)
            else load_adapter_dir(source, self.spec, self.settings)
        )
        version = next(self._versions)
        resolved = ResolvedAdapter(
            name=name,
            version=version,
            uid=f"{name}@{version}",
            info=adapter.info,
            adapter=adapter,
            nbytes=adapter.nbytes,
        )
        self._adapters[name] = resolved
        return resolved

    def remove(self, name: str) -> None:
        self._adapters.pop(name, None)

    def resolve(self, name: str) -> ResolvedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise NotFoundError(f"adapter {name!r} not found") from None

    async def get(self, name: str) -> ResolvedAdapter:
        return self.resolve(name)
