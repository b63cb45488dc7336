"""The async engine API the gRPC layer calls: submit, stream tokens, cancel.

Steps run on one worker thread (torch releases the GIL in its kernels, so the event loop stays
responsive); events cross back to the loop through an `EventRelay`: every event a step emits is handed
over by one `call_soon_threadsafe` after the step, not one per event (a 64-row decode step wakes the loop
once, not 64 times, which on a small CPU takes cycles and the GIL from the engine thread mid-step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.cpu.canary import CpuCanary
from adapterserve.server.cpu.governor import CpuGovernor, MeteredWork, ProcCounters
from adapterserve.server.cpu.idle_memory import IdleTrim
from adapterserve.server.cpu.omp_pools import release_openmp_pool, set_thread_threads
from adapterserve.server.cpu.thread_names import name_this_thread
from adapterserve.server.cpu.threads import ThreadPlan, apply_threads
from adapterserve.server.engine.core import EngineCore
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.provider import AdapterProvider, ResolvedAdapter
from adapterserve.server.engine.stats import EngineStats
from adapterserve.server.engine.types import GenerationRequest, TokenEvent
from adapterserve.server.errors import UnavailableError
from adapterserve.server.model.loading import LoadedBase
from adapterserve.server.settings import EngineSettings

log = logging.getLogger(__name__)


class EventRelay:
    """Events from the engine thread, buffered until `flush` hands them all to the event loop at once.
    Order is kept: events are delivered in the order they were emitted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[RequestHandle, TokenEvent]] = []

    def emit(self, handle: RequestHandle, event: TokenEvent) -> None:
        with self._lock:
            self._pending.append((handle, event))

    def flush(self) -> None:
        """Schedule the delivery of every buffered event (one loop wake-up; none when nothing is buffered)."""
        with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
        self._loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[RequestHandle, TokenEvent]]) -> None:
    for handle, event in batch:
        handle.put(event)


class RequestHandle:
    """One submitted request: `async for event in handle` until the event with a finish_reason (with
    n choices: until each choice's final event). `adapter_version`: the version of the adapter that
    serves every token of it (0: the base model)."""

    def __init__(self, engine: Engine, request_id: str, choices: int = 1, adapter_version: int = 0):
        self.request_id = request_id
        self.adapter_version = adapter_version
        self._engine = engine
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False
        self._open = choices  # choices (GenerationRequest.n) without their final event yet

    def put(self, event: TokenEvent) -> None:
        """(The event loop) one event for the reader."""
        self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finish_reason is not None:
            self._open -= 1  # with n choices, each one's last event (TokenEvent.index) has a reason
            self._done = self._open <= 0
        return event

    def cancel(self) -> None:
        """Stop generating: the row and the adapter slot are freed at the next step boundary."""
        if not self._done:
            self._engine.cancel_request(self.request_id)


class Engine:
    def __init__(
        self,
        base: LoadedBase,
        adapters: AdapterProvider,
        settings: EngineSettings,
        cpu: ThreadPlan | None = None,
    ):
        """cpu: the CPU thread plan (server/cpu/threads.py), applied on the engine thread; None keeps
        torch's thread count as it is (GPU engines, tests)."""
        self.base, self.adapters, self.settings = base, adapters, settings
        self.cpu = cpu
        self.governor: CpuGovernor | None = None
        self.core = EngineCore(base, settings)
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._relay: EventRelay | None = None
        self._idle_trim = IdleTrim()  # freed memory back to the system once idle (cpu/idle_memory.py)

    async def start(self) -> None:
        self._relay = EventRelay(asyncio.get_running_loop())
        release_openmp_pool()  # the engine thread's pool should be the process's only one (cpu/omp_pools.py)
        self._thread = threading.Thread(target=self._run, name="adapterserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the worker; requests still running finish with an ERROR event (UNAVAILABLE)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.core.fail_all(UnavailableError("the server is shutting down"))
        if self._relay is not None:
            self._relay.flush()

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises NotFoundError (unknown adapter), InvalidArgumentError, QueueFullError."""
        if self._stopping or self._relay is None:
            raise UnavailableError("the engine is not running")
        if not request.request_id:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        resolved = await self.adapters.get(request.adapter) if request.adapter else None
        version = resolved.version if resolved is not None else 0
        handle = RequestHandle(self, request.request_id, choices=request.n, adapter_version=version)
        relay = self._relay
        if request.structured is not None:  # compile the grammar (or find it cached) off the event loop
            await asyncio.to_thread(self.core.grammars.cache.template, request.structured)
        seq = self.core.new_sequence(request, resolved, lambda event: relay.emit(handle, event))
        self.core.add(seq)
        self._wake.set()
        return handle

    async def submit_batch(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue several requests together (a list of prompts), all or none: every one is checked as
        `submit` checks it before any is queued, then all join the waiting queue at once. Raises as
        `submit` does; QueueFullError when the queue has no room for all of them."""
        if self._stopping or self._relay is None:
            raise UnavailableError("the engine is not running")
        relay = self._relay
        requests = [
            r if r.request_id else dataclasses.replace(r, request_id=uuid.uuid4().hex) for r in requests
        ]
        resolved = {
            name: await self.adapters.get(name) for name in dict.fromkeys(r.adapter for r in requests) if name
        }
        for structured in dict.fromkeys(r.structured for r in requests if r.structured is not None):
            await asyncio.to_thread(self.core.grammars.cache.template, structured)
        handles: list[RequestHandle] = []
        seqs = []
        for request in requests:
            adapter = resolved.get(request.adapter or "")
            version = adapter.version if adapter is not None else 0
            handle = RequestHandle(self, request.request_id, choices=request.n, adapter_version=version)
            emit = functools.partial(relay.emit, handle)
            seqs.append(self.core.new_sequence(request, adapter, emit))
            handles.append(handle)
        self.core.add_all(seqs)
        self._wake.set()
        return handles

    def stats(self) -> EngineStats:
        return self.core.stats()

    def is_resident(self, name: str, version: int) -> bool:
        """Whether this adapter version currently holds a device slot."""
        return self.core.bank.table.lookup((name, version)) is not None

    async def pin(self, resolved: ResolvedAdapter) -> None:
        """Load an adapter version into a device slot and pin it (never evicted). Raises
        ResourceExhaustedError when no slot can be pinned."""
        future = self.core.call_on_engine_thread(lambda: self.core.pin_adapter(resolved))
        self._wake.set()
        await asyncio.wrap_future(future)

    async def preload(self, resolved: ResolvedAdapter) -> bool:
        """Write an adapter version into a device slot between two steps, so that its first request finds
        it resident (an in-place update). False when every slot is held by running requests or pins (the
        first request loads it then); True also for prompt-tuning adapters, which need no slot."""

        def load() -> bool:
            if resolved.adapter.handler.hook == HookSite.PROMPT:
                return True
            if self.core.bank.acquire(resolved.key, resolved.adapter) is None:
                return False
            self.core.bank.release(resolved.key)
            return True

        future = self.core.call_on_engine_thread(load)
        self._wake.set()
        return bool(await asyncio.wrap_future(future))

    async def forget(self, name: str, version: int) -> None:
        """An adapter version was replaced or deleted: unpin its device slot and free it now unless a
        running request still uses it (then LRU frees it after that request)."""

        def drop() -> None:
            self.core.bank.unpin((name, version))
            self.core.bank.drop((name, version))

        future = self.core.call_on_engine_thread(drop)
        self._wake.set()
        await asyncio.wrap_future(future)

    async def unpin(self, name: str, version: int) -> None:
        future = self.core.call_on_engine_thread(lambda: self.core.bank.unpin((name, version)))
        self._wake.set()
        await asyncio.wrap_future(future)

    def cancel_request(self, request_id: str) -> None:
        self.core.cancel(request_id)
        self._wake.set()

    def _start_cpu_threads(self) -> None:
        """On the engine thread: its intra-op threads, and the contention governor if the plan has one."""
        plan = self.cpu
        if plan is None:
            return
        workers = plan.prefill_threads if isinstance(self.core.cache, PagedKVCache) else 0
        if plan.prefill_threads and not workers:
            log.warning("prefill workers need the paged KV cache: prefill runs inline (kv_cache='dense')")
        if workers:
            # prefill on the workers (one intra-op thread each); decode here, on `threads` OpenMP threads
            # when no prefill job runs beside it, else on the CPUs the workers leave (at least one)
            set_thread_threads(1)
            self.core.start_prefill_workers(workers)
            self.core.cpu_decode.threads = plan.threads
            self.core.cpu_decode.threads_beside_jobs = max(1, plan.threads - workers)
        else:
            apply_threads(plan.threads)
        if plan.governed and plan.threads > 1:
            canary = CpuCanary() if CpuCanary.available() else None
            counters = ProcCounters(plan.budget.affinity_cpus, exclude=canary.tids if canary else ())
            if counters.read() is None:
                log.info("CPU contention governor off: this system has no per-thread scheduler counters")
            elif workers:  # the governor sizes the decode steps that run alone, judged on those steps only
                meter = self.core.cpu_decode.meter = MeteredWork(counters.read)
                self.governor = CpuGovernor(
                    plan.threads,
                    plan.budget.affinity,
                    self._set_decode_threads,
                    meter.read,
                    canary=canary,
                    clock=meter.clock,
                )
            else:
                self.governor = CpuGovernor(
                    plan.threads, plan.budget.affinity, apply_threads, counters.read, canary=canary
                )

    def _set_decode_threads(self, threads: int) -> None:
        self.core.cpu_decode.threads = threads

    def _run(self) -> None:
        name_this_thread()
        self._start_cpu_threads()
        governor = self.governor
        while not self._stopping:
            if not self.core.has_work():
                if governor is not None:
                    governor.idle()
                if self.core.decode_pacer is not None:
                    self.core.decode_pacer.idle()
                self._idle_trim.idle()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            if governor is not None:
                governor.before_step()
            try:
                self.core.step()
            except Exception:  # a bug in the step itself: log it, keep the loop alive
                log.exception("engine step crashed")
            finally:
                self._idle_trim.worked()
                if governor is not None:
                    governor.after_step()
                if self._relay is not None:
                    self._relay.flush()
        self.core.stop_prefill_workers()  # jobs in flight finish and are booked before shutdown
