"""A cheap test of whether one more busy thread of ours would get a CPU, without touching the engine's.

Why: at one engine thread the governor (governor.py) cannot tell a competitor at our priority (a load
client on the same host) from low-priority work (a nice'd batch job, a cgroup with fewer CPU shares) that
keeps the other CPUs just as busy but yields at once: our one thread waits for a CPU in neither case.
Trying a second OpenMP thread tells them apart, but beside a real competitor it costs the whole try: every
parallel region waits at its barriers for the descheduled worker, and the engine made almost no progress
for the second or two the try lasted (three tries cost a 50 s AIPerf run 8 s, docs/cpu.md).

How: a thread of our process spins for `seconds` (SHA-256 over a buffer, which runs with the GIL
released, so the engine thread's Python is not held up) and reads its own scheduler counters
(`/proc/thread-self/schedstat`: ns on a CPU, ns runnable but waiting). The fraction of the time it wanted
a CPU and waited is what an extra engine thread would wait: ~0.5 beside work at our priority that fills
the CPU, ~0 beside work that yields. It runs in the background; the governor polls it between steps.
"""

from __future__ import annotations

import hashlib
import threading
import time

from adapterserve.server.cpu.thread_names import name_this_thread

CANARY_S = 0.2  # seconds one test spins: ~0.1 s of the competitor's CPU when it shares one with us
_CHUNK = bytes(4 << 20)  # hashed per GIL release: a few ms of work


def thread_schedstat() -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting for one) of the calling thread, None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


class CpuCanary:
    """One background spinner; `start()` a test, `poll()` its result once done."""

    def __init__(self, seconds: float = CANARY_S) -> None:
        self.seconds = seconds
        self._go = threading.Event()
        self._lock = threading.Lock()
        self._result: float | None = None
        self._running = False
        self._thread: threading.Thread | None = None
        self.tids: set[int] = set()  # the spinner's thread id: not one of the engine's threads

    @staticmethod
    def available() -> bool:
        return thread_schedstat() is not None

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Begin a test in the background (no-op while one runs)."""
        if self._running:
            return
        self._running, self._result = True, None
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="adapterserve-cpu-canary", daemon=True)
            self._thread.start()
        self._go.set()

    def poll(self) -> float | None:
        """The last test's waiting fraction (0 = it always had a CPU, 1 = it never did) once it is
        done, else None. Each result is returned once."""
        with self._lock:
            result, self._result = self._result, None
        if result is not None:
            self._running = False
        return result

    def _loop(self) -> None:
        name_this_thread()
        self.tids.add(threading.get_native_id())
        while True:
            self._go.wait()
            self._go.clear()
            waiting = self.measure()
            with self._lock:
                self._result = 1.0 if waiting is None else waiting

    def measure(self) -> float | None:
        """Spin for `seconds` on the calling thread; the fraction of that time spent waiting for a CPU."""
        before = thread_schedstat()
        if before is None:
            return None
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            hashlib.sha256(_CHUNK).digest()
        after = thread_schedstat()
        if after is None:
            return None
        ran, waited = after[0] - before[0], after[1] - before[1]
        return waited / max(ran + waited, 1)
