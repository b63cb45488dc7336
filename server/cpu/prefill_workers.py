"""Threads that run prefill forwards while the engine thread decodes (a CPU engine's parallelism).

Why: on a CPU the engine used to split every forward over OpenMP threads. libgomp's threads meet at a
barrier after every op; when another process takes one of their cores (a load client on the same host,
a sidecar, a CPU quota), the whole forward waits for the descheduled thread, and the spinning ones burn
the core the other process wanted (governor.py then drops to one thread). Measured on 2 cores, 8
prefills of 128 tokens: one thread 3.9-4.0 s, one forward over 2 OpenMP threads 2.3-2.4 s, two Python
threads each running its own forwards on one OpenMP thread 2.0-2.2 s; beside a busy process at our
priority: 4.2-4.4 s, 8.6-9.4 s and 3.4-3.7 s. Independent forwards on threads of
their own never wait for each other, so they use whatever CPU time the scheduler gives them.

How: `count` daemon threads, each with one intra-op thread, take jobs (a prefill chunk's forward,
planned by engine/scheduler.py, submitted by engine/step_runner.py) from a queue; torch releases the GIL
inside its ops, so they run beside the engine thread's decode step. A job touches only its own rows:
their KV blocks (through a copy of their block-table rows, so the engine thread may renumber rows
meanwhile), their inputs and, for scoring rows, their score lists; the engine thread books the result
(first tokens, promotion to the decoding rows) once the job is done (engine/booking.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from adapterserve.server.cpu.omp_pools import set_thread_threads
from adapterserve.server.cpu.thread_names import name_this_thread

log = logging.getLogger(__name__)

_STOP = object()


class PrefillWorkers:
    """A fixed pool of threads with one intra-op thread each. `submit(fn)` -> Future of fn's result."""

    def __init__(
        self, count: int, *, on_done: Callable[[], None] | None = None, name: str = "adapterserve-prefill"
    ):
        if count < 1:
            raise ValueError(f"prefill workers: {count}, need at least one")
        self.count = count
        self._on_done = on_done  # called (on the worker) after every job: wakes the engine thread
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def thread_ids(self) -> list[int]:
        return [t.native_id for t in self._threads if t.native_id is not None]

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        """Stop the threads after the jobs already queued (they finish first)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        name_this_thread()
        set_thread_threads(1)  # this thread's forwards run on it alone (the process default is untouched)
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the engine thread, which fails the job's rows
                    future.set_exception(exc)
            if self._on_done is not None:
                self._on_done()
