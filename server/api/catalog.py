"""The AdapterCatalog the Admin servicer uses, backed by the store's AdapterRegistry (host cache + disk).

Pins live in the registry (host tier) and in the engine's slot table (the adapter is loaded into a
device slot and pinned there); the device tier is reported when the engine says an adapter version sits in a
device slot (`device_resident`, optional).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from adapterserve.server.api.contracts import AdapterRecord, StoredFile, UpdateOutcome, UploadResult
from adapterserve.server.errors import FailedPreconditionError, ServeError
from adapterserve.server.store.live import LiveAdapters
from adapterserve.server.store.manifest import Manifest
from adapterserve.server.store.registry import AdapterRegistry
from adapterserve.server.store.upload import UploadRequest

log = logging.getLogger(__name__)

# (name, version) -> True when that adapter version is resident in a device slot.
DeviceResident = Callable[[str, int], bool]
# Pin a resolved adapter in a device slot (the engine's pin) / unpin (name, version).
PinDevice = Callable[[Any], Awaitable[None]]
UnpinDevice = Callable[[str, int], Awaitable[None]]
# Write a resolved adapter version into a device slot now (the engine's preload); False if none was free.
PreloadDevice = Callable[[Any], Awaitable[bool]]


class StoreCatalog:
    """AdapterCatalog over an AdapterRegistry (and its AdapterStore)."""

    def __init__(
        self,
        registry: AdapterRegistry,
        device_resident: DeviceResident | None = None,
        pin_device: PinDevice | None = None,
        unpin_device: UnpinDevice | None = None,
        forget_device: UnpinDevice | None = None,
        live: LiveAdapters | None = None,
        preload_device: PreloadDevice | None = None,
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self._device_resident = device_resident
        self._pin_device = pin_device
        self._unpin_device = unpin_device
        self._forget_device = forget_device
        self.live = live  # in-place updates (None: UpdateAdapter is refused)
        self._preload_device = preload_device

    def record(self, manifest: Manifest) -> AdapterRecord:
        """The API view of a stored adapter, with its pin and cache tier now."""
        tier: str = self.registry.tier(manifest.name)
        if self._device_resident is not None and self._device_resident(manifest.name, manifest.version):
            tier = "device"
        return AdapterRecord(
            name=manifest.name,
            info=manifest.info,
            files=tuple(
                StoredFile(name=fname, size_bytes=entry.size, sha256=entry.sha256)
                for fname, entry in sorted(manifest.files.items())
            ),
            digest="sha256:" + manifest.digest,
            base_fingerprint=manifest.base_fingerprint or "",
            created_at=manifest.created_at,
            description=manifest.description,
            pinned=self.registry.is_pinned(manifest.name),
            version=self._served_version(manifest),
            cache_tier=tier,
            origin=manifest.origin,
        )

    async def upload(self, request: UploadRequest, files: AsyncIterator[tuple[str, bytes]]) -> UploadResult:
        updated = self._updated_version(request.name)
        result = await self.registry.upload(request, files)
        name = request.name
        if result.replaced is not None:
            await self._forget(result.replaced)
            await self._forget_updated(name, updated)
            if self.registry.is_pinned(name):  # the pin follows the name to its new version
                await self.pin(name)
        return UploadResult(
            record=self.record(result.manifest),
            replaced=result.replaced is not None,
            received_bytes=result.received_bytes,
        )

    async def delete(self, name: str) -> AdapterRecord | None:
        before = self.store.current(name)
        record = self.record(before) if before is not None else None
        updated = self._updated_version(name)
        await self.registry.delete(name)
        if before is not None:
            await self._forget(before)
        await self._forget_updated(name, updated)
        return record

    def _updated_version(self, name: str) -> int | None:
        return self.live.live_version(name) if self.live is not None else None

    async def _forget_updated(self, name: str, version: int | None) -> None:
        """An in-place updated version superseded by an upload or a delete leaves its device slot."""
        if version is not None and self._forget_device is not None:
            await self._forget_device(name, version)

    async def _forget(self, manifest: Manifest) -> None:
        if self._forget_device is not None:
            await self._forget_device(manifest.name, manifest.version)

    async def restore_pins(self) -> list[str]:
        """At start: load every adapter pinned before the restart into host memory and a device slot."""
        restored = []
        for name in self.registry.pinned():
            try:
                await self.pin(name)
                restored.append(name)
            except ServeError as err:
                log.warning("pinned adapter %r not restored: %s", name, err)
        return restored

    async def list(self) -> list[AdapterRecord]:
        return [self.record(m) for m in self.store.list()]

    async def get(self, name: str) -> AdapterRecord:
        return self.record(self.store.manifest(name))

    async def pin(self, name: str) -> AdapterRecord:
        was_pinned = self.registry.is_pinned(name)
        resolved = await self.registry.pin(name)
        if self.live is not None:  # an in-place updated version is what requests get
            resolved = await self.live.get(name)
        if self._pin_device is not None:
            try:
                await self._pin_device(resolved)
            except BaseException:
                if not was_pinned:
                    self.registry.unpin(name)  # all or nothing (an earlier pin stays recorded)
                raise
        return self.record(self.store.manifest(name))

    def _served_version(self, manifest: Manifest) -> int:
        """The version requests get: an in-place update's when one is newer than the stored folder."""
        live = self.live.live_version(manifest.name) if self.live is not None else None
        return manifest.version if live is None else live

    async def update(self, name: str, tensors: dict[str, Any], *, persist: bool = False) -> UpdateOutcome:
        """Replace `name`'s weights in place (live.py), then put the new version in a device slot (pinned
        when the name is) and free the old version's slot once no running request holds it."""
        if self.live is None:
            raise FailedPreconditionError("in-place adapter updates are not enabled on this server")
        result = await self.live.update(name, tensors, persist=persist)
        resolved = result.resolved
        resident = False
        if self.registry.is_pinned(name) and self._pin_device is not None:
            await self._pin_device(resolved)
            resident = True
        elif self._preload_device is not None:
            resident = await self._preload_device(resolved)
        if self._forget_device is not None and result.previous_version != resolved.version:
            await self._forget_device(name, result.previous_version)
        return UpdateOutcome(
            name=name,
            version=resolved.version,
            previous_version=result.previous_version,
            persisted_version=result.persisted_version,
            persisted=result.persisted,
            resident=resident,
        )

    async def refresh(self, name: str) -> tuple[AdapterRecord, bool]:
        """Ask a fetched adapter's source again; a new version replaces it everywhere (the pin follows)."""
        before = self.store.current(name)
        result = await self.registry.refresh(name)
        if result.changed and before is not None and before.uid != result.manifest.uid:
            await self._forget(before)
            if self.registry.is_pinned(name):
                await self.pin(name)
        return self.record(self.store.manifest(name)), result.changed

    async def unpin(self, name: str) -> AdapterRecord:
        self.registry.unpin(name)
        manifest = self.store.manifest(name)
        if self._unpin_device is not None:
            await self._unpin_device(manifest.name, self._served_version(manifest))
        return self.record(manifest)
