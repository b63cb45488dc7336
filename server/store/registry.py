"""The host-RAM tier of the adapter cache: loaded adapters, LRU by bytes, pinning, single-flight loads.

Tiers: device slots (the engine's slot table) <- host memory (this registry) <- disk (AdapterStore).
`get(name)` is the engine's AdapterProvider: a hit returns the cached ResolvedAdapter; a miss loads the
adapter from the store in a worker thread, once, however many requests ask for it at the same time.

A ResolvedAdapter is immutable and keyed by (name, version). Replacing or deleting an adapter drops
the cache entry and bumps the version, but never touches an object a running request already holds:
that request finishes on the old weights, and the next `get` sees the new state.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from adapterserve.server.cpu.omp_pools import run_releasing_pool
from adapterserve.server.engine.provider import ResolvedAdapter
from adapterserve.server.errors import FailedPreconditionError, NotFoundError
from adapterserve.server.settings import CacheSettings
from adapterserve.server.store.manifest import Manifest
from adapterserve.server.store.names import validate_name
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import CommitResult, UploadRequest

if TYPE_CHECKING:
    from adapterserve.server.store.sources.fetcher import RefreshResult, SourceFetcher

EventKind = Literal["hit", "miss", "load", "load_failed", "evict", "invalidate"]


@dataclass(frozen=True)
class CacheEvent:
    """One cache event, for metrics. `nbytes` is the adapter's host size (0 when unknown)."""

    kind: EventKind
    name: str
    version: int = 0
    nbytes: int = 0


@dataclass
class CacheStats:
    """Counters of the host tier and sizes of the host and disk tiers."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    host_bytes: int = 0
    host_entries: int = 0
    host_capacity_bytes: int = 0
    pinned: int = 0
    disk_adapters: int = 0
    disk_bytes: int = 0
    load_seconds_total: float = 0.0


class AdapterRegistry:
    """Host-memory LRU over the store, sized in bytes, with pinning and single-flight loads.

    Call from one event loop. Loads run in worker threads (`asyncio.to_thread`).
    """

    def __init__(
        self,
        store: AdapterStore,
        settings: CacheSettings | None = None,
        *,
        listener: Callable[[CacheEvent], None] | None = None,
        verify_on_load: bool = True,
        sources: SourceFetcher | None = None,
    ) -> None:
        """sources: fetches an adapter not in the store on first use (store/sources/), and keeps the
        fetched ones on disk within its budget (evicting through `delete`)."""
        self.store = store
        self.sources = sources
        self.capacity = (settings or CacheSettings()).host_cache_bytes
        self.listener = listener
        self.verify_on_load = verify_on_load
        self._entries: OrderedDict[str, ResolvedAdapter] = OrderedDict()  # LRU first, MRU last
        self._bytes = 0
        self._pinned: set[str] = set(store.pinned_names())  # pins survive restarts (store's pins file)
        self._inflight: dict[tuple[str, str], asyncio.Task[ResolvedAdapter]] = {}
        self._stats = CacheStats()
        if sources is not None:
            sources.on_refreshed = self._refreshed

    # ------------------------------------------------------------------ AdapterProvider
    async def get(self, name: str) -> ResolvedAdapter:
        """The adapter `name` in host memory, loading it from disk if needed.

        Raises InvalidArgumentError (malformed name), NotFoundError (not in the store or not served),
        or the validator's AdapterValidationError if the stored adapter no longer loads. With sources, an
        adapter not in the store is fetched first (see SourceFetcher.ensure for its errors).
        """
        validate_name(name)
        if not self.sources:
            return await self._get(name)
        await self._ensure(name)
        try:
            return await self._get(name)
        except NotFoundError:  # evicted from disk between the check and the load: fetch it again
            await self._ensure(name)
            return await self._get(name)

    async def _get(self, name: str) -> ResolvedAdapter:
        manifest = self.store.manifest(name)  # NotFoundError
        entry = self._entries.get(name)
        if entry is not None and entry.uid == manifest.uid:
            self._entries.move_to_end(name)
            self._stats.hits += 1
            self._emit("hit", name, entry.version, entry.nbytes)
            return entry
        if entry is not None:  # stale: the store changed behind the registry
            self._drop(name, "invalidate")
        self._stats.misses += 1
        self._emit("miss", name, manifest.version, manifest.nbytes)
        key = (name, manifest.uid)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(name, manifest))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        # shield: a cancelled caller must not cancel the load other callers wait for
        return await asyncio.shield(task)

    async def _load(self, name: str, manifest: Manifest) -> ResolvedAdapter:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            stored, loaded = await run_releasing_pool(self.store.load, name, verify=self.verify_on_load)
        except BaseException:
            self._stats.load_failures += 1
            self._emit("load_failed", name, manifest.version, 0)
            raise
        self._stats.loads += 1
        self._stats.load_seconds_total += loop.time() - started
        resolved = ResolvedAdapter(
            name=name,
            version=stored.version,
            uid=stored.uid,
            info=loaded.info,
            adapter=loaded,
            nbytes=int(loaded.nbytes),
        )
        self._emit("load", name, resolved.version, resolved.nbytes)
        current = self.store.current(name)
        if current is not None and current.uid == resolved.uid:  # still the served version: cache it
            self._insert(resolved)
        return resolved

    # ------------------------------------------------------------------ LRU
    def _insert(self, resolved: ResolvedAdapter) -> None:
        name = resolved.name
        if name in self._entries:
            self._drop(name, "invalidate")
        if resolved.nbytes > self.capacity and name not in self._pinned:
            return  # larger than the whole tier: served to its caller, not kept
        self._entries[name] = resolved
        self._bytes += resolved.nbytes
        self._evict_to_fit()

    def _evict_to_fit(self) -> None:
        for victim in list(self._entries):
            if self._bytes <= self.capacity:
                return
            if victim in self._pinned:
                continue
            self._drop(victim, "evict")

    def _drop(self, name: str, kind: EventKind) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        if kind == "evict":
            self._stats.evictions += 1
        self._emit(kind, name, entry.version, entry.nbytes)

    # ------------------------------------------------------------------ pinning
    async def pin(self, name: str) -> ResolvedAdapter:
        """Pin `name` in host memory (never evicted while pinned) and load it now if needed."""
        validate_name(name)
        if self.sources:
            await self._ensure(name)  # a pin may name an adapter not fetched yet
        self.store.manifest(name)  # NotFoundError before the pin is recorded
        was_pinned = name in self._pinned
        self._pinned.add(name)
        try:
            resolved = await self.get(name)
            if not was_pinned:
                await asyncio.to_thread(self.store.save_pins, set(self._pinned))
        except BaseException:
            if not was_pinned:
                self._pinned.discard(name)
            raise
        return resolved

    def pinned(self) -> list[str]:
        """Pinned names, sorted (restored from the store at start)."""
        return sorted(self._pinned)

    def unpin(self, name: str) -> None:
        """Unpin `name`; it becomes evictable (and is evicted now if the tier is over its budget)."""
        validate_name(name)
        self.store.manifest(name)
        if name in self._pinned:
            self._pinned.discard(name)
            self.store.save_pins(set(self._pinned))
        self._evict_to_fit()

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def tier(self, name: str) -> Literal["host", "disk"]:
        """Where the current version of `name` lives in this registry's view (the engine knows "device")."""
        entry = self._entries.get(name)
        manifest = self.store.current(name)
        return "host" if entry is not None and manifest is not None and entry.uid == manifest.uid else "disk"

    def cached_names(self) -> list[str]:
        """Names in host memory, least recently used first."""
        return list(self._entries)

    # ------------------------------------------------------------------ changes through the registry
    async def upload(self, request: UploadRequest, files: AsyncIterable[tuple[str, bytes]]) -> CommitResult:
        """Store an upload (see AdapterStore.upload_async), drop any cached older version and put the
        adapter the upload validated into host memory: its first request does not read it again."""
        result = await self.store.upload_async(request, files)
        self._stored(result)
        return result

    def _stored(self, result: CommitResult) -> None:
        """A new version was stored (upload or fetch): drop any older one, cache the validated one."""
        name = result.manifest.name
        self._drop(name, "invalidate")
        validated, manifest = result.validated, result.manifest
        current = self.store.current(name)
        if validated is not None and current is not None and current.uid == manifest.uid:
            self._insert(
                ResolvedAdapter(
                    name=name,
                    version=manifest.version,
                    uid=manifest.uid,
                    info=validated.info,
                    adapter=validated,
                    nbytes=int(validated.nbytes),
                )
            )

    # ------------------------------------------------------------------ sources
    async def _ensure(self, name: str) -> None:
        """Fetch `name` from the sources if the store lacks it; then keep the disk tier in budget."""
        assert self.sources is not None
        result = await self.sources.ensure(name)
        if result is not None:
            entry = self._entries.get(name)
            if entry is None or entry.uid != result.manifest.uid:
                self._stored(result)
            await self._evict_disk(keep=name)

    async def _evict_disk(self, keep: str) -> None:
        """Delete fetched adapters, least recently used first, until they fit the disk budget; never a
        pinned one, one being fetched or loaded, or `keep`."""
        assert self.sources is not None
        protected = self._pinned | {n for n, _ in self._inflight} | self.sources.inflight() | {keep}
        for victim in self.sources.disk.victims(protected):
            try:
                await self.delete(victim)
            except NotFoundError:
                pass
            self.sources.disk.evicted(victim)

    async def refresh(self, name: str) -> RefreshResult:
        """Ask a fetched adapter's source again; a changed version replaces it (store, then caches).
        FailedPreconditionError without sources or for an uploaded adapter."""
        validate_name(name)
        if not self.sources:
            self.store.manifest(name)  # NotFoundError first
            raise FailedPreconditionError("the server has no adapter sources (--adapter-source)")
        result = await self.sources.refresh(name)
        await self._refreshed(result)
        return result

    async def _refreshed(self, result: RefreshResult) -> None:
        if result.commit is not None:
            self._stored(result.commit)

    async def delete(self, name: str) -> Manifest | None:
        """Delete from the store and from host memory; running requests keep the object they hold."""
        old = await asyncio.to_thread(self.store.delete, name)
        self._drop(name, "invalidate")
        if name in self._pinned:
            self._pinned.discard(name)
            await asyncio.to_thread(self.store.save_pins, set(self._pinned))
        return old

    # ------------------------------------------------------------------ metrics
    def stats(self) -> CacheStats:
        """A snapshot of the counters and tier sizes."""
        manifests = self.store.list()
        s = self._stats
        return CacheStats(
            hits=s.hits,
            misses=s.misses,
            loads=s.loads,
            load_failures=s.load_failures,
            evictions=s.evictions,
            host_bytes=self._bytes,
            host_entries=len(self._entries),
            host_capacity_bytes=self.capacity,
            pinned=len(self._pinned),
            disk_adapters=len(manifests),
            disk_bytes=sum(m.size for m in manifests),
            load_seconds_total=s.load_seconds_total,
        )

    def _emit(self, kind: EventKind, name: str, version: int, nbytes: int) -> None:
        if self.listener is not None:
            self.listener(CacheEvent(kind, name, version, nbytes))
