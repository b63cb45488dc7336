"""Where the engine gets adapters from: the store's host cache in the server (store/registry.py), a dict
offline. What it gets is a ResolvedAdapter, defined here: the engine never imports the store."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterserve.server.adapters.loader import LoadedAdapter, load_adapter_dir
from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.errors import NotFoundError
from adapterserve.server.model.spec import BaseModelSpec
from adapterserve.server.settings import EngineSettings

__all__ = ["AdapterProvider", "ResolvedAdapter", "StaticAdapterProvider"]


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter ready for the engine: identity, what it is, and its host-memory weights. Immutable and
    keyed by (name, version): a replaced or deleted adapter never changes one a request holds."""

    name: str
    version: int
    uid: str  # unique per stored upload (a name re-created after a delete gets a new uid)
    info: AdapterInfo
    adapter: LoadedAdapter  # what the loader (the store's validator in the server) returned
    nbytes: int

    @property
    def key(self) -> tuple[str, int]:
        """(name, version): the device slot table's key."""
        return (self.name, self.version)

    @property
    def weights(self) -> object:
        """The served tensors (the LoadedAdapter's `weights`)."""
        return self.adapter.weights


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
