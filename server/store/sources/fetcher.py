"""Fetch on first use: an adapter named in a request and not in the store is resolved against the
sources, in order, once per name however many requests wait for it.

A fetch (in a worker thread, so the engine and the event loop keep serving everyone else):
1. asks each source for the name (`stat`) until one holds it; none: `SourceNotFoundError` naming
   the sources tried. A source that cannot be asked stops the search (UNAVAILABLE): a later source
   could hold another adapter of the same name, which must not be served in its place;
2. checks the sizes the source told against the store's cap before any byte moves;
3. streams the files into the store's own upload session (`AdapterStore.begin_upload`): the same
   private folder, byte cap, pickle sniffing, file-name checks and, at commit, the same validator
   (config allow-list, safetensors parsing, shapes against the base, kind supported) and the same
   atomic rename as an upload. Any failure removes the temporary folder: nothing half-written;
4. records where the adapter came from in its manifest (`Origin`: source, ETag or revision, time).

Waiting requests are bounded by `fetch_timeout_s` (UNAVAILABLE) and by their own deadline (a cancelled
waiter leaves the fetch running for the others). The fetch itself stops at the same bound: the source
clients time out and the copy checks the deadline between chunks. A name found missing or invalid is
remembered for `negative_ttl_s`, so a storm of requests for a broken name asks the source once.
Unavailability is not remembered: the next request tries again.

Freshness: `refresh(name)` asks the source again and replaces the stored adapter (the upload's atomic
replace) when its ETag or revision changed; with `ttl_s`, a use after that age starts a refresh in the
background while requests go on with the version they have.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from adapterserve.server.cpu.omp_pools import releasing_pool
from adapterserve.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServeError,
    UnavailableError,
)
from adapterserve.server.settings import SourceSettings
from adapterserve.server.store.layout import ACCEPTED_FILES
from adapterserve.server.store.manifest import Manifest, Origin
from adapterserve.server.store.names import validate_name
from adapterserve.server.store.sources.base import (
    AdapterSource,
    RemoteAdapter,
    SourceNotFoundError,
    SourceUnavailableError,
)
from adapterserve.server.store.sources.disk import DiskTier
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import CommitResult, UploadRequest

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BYTES_BUCKETS = tuple(float(1 << p) for p in range(10, 32, 2))  # 1 KiB .. 1 GiB
Outcome = str  # "fetched", "unchanged", "not_found", "invalid", "unavailable"
ALL_SOURCES = "*"  # the source label of an outcome that concerns every source (not found)
FETCH_THREADS = 8  # fetches running at once; they wait on the network, so they get threads of their own
MAX_NEGATIVE = 10_000  # names remembered as missing or invalid at most (expired ones are dropped first)


@dataclass
class Histogram:
    """Cumulative bucket counts, sum and count, as Prometheus histograms report them."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class FetchStats:
    """What the metrics endpoint reports about fetches."""

    outcomes: dict[tuple[str, Outcome], int] = field(default_factory=dict)  # (source, outcome) -> count
    seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    nbytes: Histogram = field(default_factory=lambda: Histogram(BYTES_BUCKETS))
    negative_hits: int = 0
    recent_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # for benchmarks

    def count(self, source: str, outcome: Outcome) -> None:
        self.outcomes[(source, outcome)] = self.outcomes.get((source, outcome), 0) + 1


@dataclass(frozen=True)
class RefreshResult:
    """What `refresh` did: `changed` when a new version was stored (`commit`)."""

    manifest: Manifest
    changed: bool
    commit: CommitResult | None = None


class SourceFetcher:
    """Fetches adapters from the sources into the store. Call its coroutines from one event loop."""

    def __init__(
        self, store: AdapterStore, sources: Sequence[AdapterSource], settings: SourceSettings
    ) -> None:
        self.store = store
        self.sources = tuple(sources)
        self.settings = settings
        self.stats = FetchStats()
        self.disk = DiskTier(store.list(), store.current, settings.store_max_bytes)
        self._inflight: dict[str, asyncio.Task[CommitResult | RefreshResult | None]] = {}
        self._negative: dict[str, tuple[float, ServeError]] = {}  # name -> (expires, monotonic; error)
        self._checked: dict[str, float] = {}  # name -> wall time its source was last asked
        self._background: set[asyncio.Task[object]] = set()
        # Fetches wait on the network: their own threads, so the default executor (host-cache loads,
        # uploads) never queues behind them.
        self._threads = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="as-fetch")
        # Set by the registry: drops the version a background refresh replaced from the caches.
        self.on_refreshed: Callable[[RefreshResult], Awaitable[None]] | None = None

    def __bool__(self) -> bool:
        return bool(self.sources)

    def inflight(self) -> set[str]:
        """Names being fetched or refreshed now."""
        return set(self._inflight)

    def describe(self) -> str:
        return ", ".join(s.uri for s in self.sources)

    # ------------------------------------------------------------------ first use
    async def ensure(self, name: str) -> CommitResult | None:
        """Make sure `name` is in the store, fetching it if not. Returns the commit when a fetch stored it
        (the validated adapter is ready for the host cache), None when it was already there.

        Raises InvalidArgumentError (bad name, before any source is asked), SourceNotFoundError,
        UnavailableError (source unreachable, or the fetch took longer than fetch_timeout_s), or the
        upload's own error for an invalid object (AdapterValidationError, ResourceExhaustedError...).
        """
        validate_name(name)
        if name in self.store:
            self.disk.touch(name)
            self._maybe_revalidate(name)
            return None
        cached = self._negative.get(name)
        if cached is not None:
            expires, err = cached
            if time.monotonic() < expires:
                self.stats.negative_hits += 1
                raise type(err)(str(err))
            self._negative.pop(name, None)
        result = await self._single_flight(name, lambda: self._fetch(name))
        return result if isinstance(result, CommitResult) else None

    async def _single_flight(
        self, name: str, start: Callable[[], Awaitable[CommitResult | RefreshResult | None]]
    ) -> CommitResult | RefreshResult | None:
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(start())
            self._inflight[name] = task
            task.add_done_callback(lambda _t, n=name: self._inflight.pop(n, None))
            task.add_done_callback(_retrieve)
        timeout = self.settings.fetch_timeout_s
        try:
            # shield: a waiter that gives up (deadline, cancel) leaves the fetch to the others
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise UnavailableError(
                f"fetching adapter {name!r} from {self.describe()} took longer than {timeout:g} s; try again"
            ) from None

    async def _fetch(
        self, name: str, *, replace: bool = False, since: Origin | None = None
    ) -> CommitResult | RefreshResult | None:
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                self._threads, releasing_pool(self._fetch_blocking), name, replace, since, started
            )
        except SourceNotFoundError as err:
            self.stats.count(ALL_SOURCES, "not_found")
            self._remember(name, err)
            raise
        except SourceUnavailableError as err:
            log.warning("adapter %r: %s", name, err)
            raise
        except (InvalidArgumentError, ResourceExhaustedError, FailedPreconditionError) as err:
            log.warning("adapter %r from the sources refused: %s", name, err)
            self._remember(name, err)
            raise
        self._checked[name] = time.time()
        if isinstance(result, CommitResult):
            self.disk.touch(name)
            elapsed = time.monotonic() - started
            self.stats.seconds.observe(elapsed)
            self.stats.recent_seconds.append(elapsed)
            self.stats.nbytes.observe(float(result.received_bytes))
            origin = result.manifest.origin
            log.info(
                "adapter %r fetched from %s (%s, %d bytes) in %.3f s",
                name,
                origin.source if origin else "?",
                result.manifest.kind,
                result.received_bytes,
                elapsed,
            )
        return result

    def _remember(self, name: str, err: ServeError) -> None:
        if self.settings.negative_ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._negative) >= MAX_NEGATIVE:  # a flood of distinct names: keep the memory bounded
            self._negative = {n: e for n, e in self._negative.items() if e[0] > now}
            while len(self._negative) >= MAX_NEGATIVE:
                self._negative.pop(next(iter(self._negative)))
        self._negative[name] = (now + self.settings.negative_ttl_s, err)

    # ------------------------------------------------------------------ the copy (worker thread)
    def _fetch_blocking(
        self, name: str, replace: bool, since: Origin | None, started: float
    ) -> CommitResult | RefreshResult | None:
        """Find `name` in the sources and store it. With `since` (a refresh), a version equal to the
        stored one is not fetched again (RefreshResult, unchanged)."""
        deadline = started + self.settings.fetch_timeout_s
        if not replace and self._stored_by_another(name):
            return None
        tried = []
        for source in self.sources:
            try:
                remote = source.stat(name)
            except SourceUnavailableError:
                self.stats.count(source.uri, "unavailable")
                raise
            if remote is None:
                tried.append(source.uri)
                continue
            if since is not None and since.source == source.uri and since.tag == remote.tag:
                self.stats.count(source.uri, "unchanged")
                return RefreshResult(manifest=self.store.manifest(name), changed=False)
            try:
                return self._copy(source, remote, replace=replace, deadline=deadline)
            except AlreadyExistsError:  # an upload, or another server on this store folder, won the race
                self._stored_by_another(name)
                return None
            except OSError as err:  # the other server's rename came between our check and ours
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and self._stored_by_another(name):
                    return None
                raise
            except SourceUnavailableError:
                self.stats.count(source.uri, "unavailable")
                raise
            except ServeError:
                self.stats.count(source.uri, "invalid")
                raise
        raise SourceNotFoundError(
            f"adapter {name!r} not found: not in the store, nor in the adapter sources tried "
            f"({', '.join(tried)})"
        )

    def _stored_by_another(self, name: str) -> bool:
        """Whether another process sharing the store folder (a Ray replica, an uploader) stored `name`
        meanwhile; if so it is served from the folder (verified against its manifest), not fetched."""
        if not os.path.lexists(self.store.root / name):
            return False
        try:
            self.store.refresh(name)
        except NotFoundError:
            return False
        return True

    def _copy(
        self, source: AdapterSource, remote: RemoteAdapter, *, replace: bool, deadline: float
    ) -> CommitResult:
        cap = self.store.max_adapter_bytes
        if remote.known_bytes > cap:  # before any byte moves (the session checks while streaming too)
            raise ResourceExhaustedError(
                f"adapter {remote.name!r} in {source.uri} is {remote.known_bytes} bytes, larger than the "
                f"cap of {cap} bytes (--max-adapter-bytes)"
            )
        origin = Origin(
            source=source.uri,
            tag=remote.tag[:1024],
            revision=remote.revision,
            fetched_at=dt.datetime.now(dt.timezone.utc),  # noqa: UP017 (py3.10)
        )
        request = UploadRequest(
            remote.name, overwrite=replace, description=f"fetched from {source.uri}", origin=origin
        )
        with self.store.begin_upload(request) as session:
            for filename in ACCEPTED_FILES:
                if filename not in remote.sizes:
                    continue  # the commit refuses the missing file with the upload's own message
                for chunk in source.chunks(remote, filename):
                    if time.monotonic() > deadline:
                        raise SourceUnavailableError(
                            f"adapter source {source.uri} is too slow: {remote.name!r} not fetched within "
                            f"{self.settings.fetch_timeout_s:g} s"
                        )
                    session.write(filename, chunk)
            result = session.commit()
        self.stats.count(source.uri, "fetched")
        return result

    # ------------------------------------------------------------------ freshness
    async def refresh(self, name: str) -> RefreshResult:
        """Ask the source again; store the new version if its ETag or revision changed.

        Raises NotFoundError (not in the store), FailedPreconditionError (an uploaded adapter: it has
        no source), SourceNotFoundError (gone from the sources: the stored copy stays), UnavailableError,
        or the upload's error for an invalid new version (the stored copy stays)."""
        manifest = self.store.manifest(name)
        if manifest.origin is None:
            raise FailedPreconditionError(
                f"adapter {name!r} was uploaded, not fetched from a source: there is nothing to refresh"
            )
        self._negative.pop(name, None)
        origin = manifest.origin
        result = await self._single_flight(name, lambda: self._fetch(name, replace=True, since=origin))
        if isinstance(result, RefreshResult):
            return result
        if isinstance(result, CommitResult):
            return RefreshResult(manifest=result.manifest, changed=True, commit=result)
        return RefreshResult(manifest=self.store.manifest(name), changed=False)

    def _maybe_revalidate(self, name: str) -> None:
        """With ttl_s: start a background refresh of a fetched adapter whose source was asked too long ago."""
        ttl = self.settings.ttl_s
        if ttl is None or name in self._inflight:
            return
        manifest = self.store.current(name)
        if manifest is None or manifest.origin is None:
            return
        now = time.time()
        checked = self._checked.get(name, manifest.origin.fetched_at.timestamp())
        if now - checked < ttl:
            return
        self._checked[name] = now
        task = asyncio.get_running_loop().create_task(self._revalidate(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revalidate(self, name: str) -> None:
        try:
            result = await self.refresh(name)
        except ServeError as err:
            log.warning(
                "adapter %r: re-checking its source failed, serving the stored version: %s", name, err
            )
            return
        if result.changed:
            log.info(
                "adapter %r: a new version from its source is served (version %d)",
                name,
                result.manifest.version,
            )
            if self.on_refreshed is not None:
                await self.on_refreshed(result)

    async def close(self) -> None:
        """Stop background refreshes; fetches in flight end on their own bound."""
        for task in list(self._background):
            task.cancel()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a fetch's exception as seen (its waiters got it; none may be left)."""
    if not task.cancelled():
        task.exception()
