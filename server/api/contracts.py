"""What the API layer needs from the engine and from the adapter store, as small Protocols.

The servicers depend on these, not on concrete classes: the real Engine and the store-backed catalog
(`catalog.py`) satisfy them, and tests can pass small doubles that honor the same contract.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.engine.types import GenerationRequest, TokenEvent
from adapterserve.server.store.manifest import Origin
from adapterserve.server.store.upload import UploadRequest


class GenerationHandle(Protocol):
    """One submitted request: iterate its TokenEvents; cancel() frees its engine work at once."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class GenerationEngine(Protocol):
    """The engine as the Generation servicer sees it."""

    async def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; raises NotFoundError, InvalidArgumentError or QueueFullError."""
        ...

    async def submit_batch(self, requests: list[GenerationRequest]) -> list[GenerationHandle]:
        """Queue several requests (a list of prompts) all or none: each is checked before any is queued;
        raises as submit does (QueueFullError when the queue has no room for all of them)."""
        ...


@dataclass(frozen=True)
class StoredFile:
    """One file of a stored adapter."""

    name: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class AdapterRecord:
    """A stored adapter as the Admin API reports it (mirrors the store's manifest plus cache state)."""

    name: str
    info: AdapterInfo
    files: tuple[StoredFile, ...]
    digest: str
    base_fingerprint: str
    created_at: dt.datetime
    description: str
    pinned: bool
    version: int
    cache_tier: str  # "disk", "host" or "device"
    origin: Origin | None = None  # where a fetched adapter came from (None: uploaded)


@dataclass(frozen=True)
class UploadResult:
    """The outcome of a successful upload."""

    record: AdapterRecord
    replaced: bool
    received_bytes: int


@dataclass(frozen=True)
class UpdateOutcome:
    """The outcome of an in-place weight update."""

    name: str
    version: int  # the version requests resolve the name to from now on
    previous_version: int
    persisted_version: int  # the newest version written to the store (0: none since updates began)
    persisted: bool  # whether this update wrote it
    resident: bool  # whether the new version already sits in a device slot


class AdapterCatalog(Protocol):
    """The adapter store as the Admin servicer sees it. Every method raises ServeError subclasses."""

    async def upload(self, request: UploadRequest, files: AsyncIterator[tuple[str, bytes]]) -> UploadResult:
        """Store an adapter from (file name, chunk) pairs, atomically; validates against the base."""
        ...

    async def delete(self, name: str) -> AdapterRecord | None:
        """Delete; returns the adapter as it was (None for a stored entry that was never served)."""
        ...

    async def list(self) -> list[AdapterRecord]:
        """Every stored adapter, in name order."""
        ...

    async def get(self, name: str) -> AdapterRecord: ...

    async def pin(self, name: str) -> AdapterRecord: ...

    async def unpin(self, name: str) -> AdapterRecord: ...

    async def update(self, name: str, tensors: dict[str, Any], *, persist: bool = False) -> UpdateOutcome:
        """Replace a stored adapter's weights in place (same names and shapes) as a new version."""

    async def refresh(self, name: str) -> tuple[AdapterRecord, bool]:
        """Ask a fetched adapter's source again; (the adapter now, whether a new version was stored)."""
        ...
