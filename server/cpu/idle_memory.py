"""Freed memory goes back to the system when the engine goes idle.

glibc's malloc keeps what the process frees in its arenas (one per thread that allocates, up to 8 per
core) for reuse, and returns it only from the top of a heap. Tensors of many sizes, allocated and freed
by the engine thread and the worker threads that parse uploads, leave free pages all over the arenas:
measured in the soak (tests/reliability/test_soak.py), ~40 MB that stayed resident after the load was
gone, all of it returned by `malloc_trim(0)` (which releases every free page of every arena).

`IdleTrim` calls it once per idle period: after the engine has run a step and then had no work for
`IDLE_TRIM_S`. Trimming under load would only make the next steps fault the pages in again; once idle,
the cost (a few ms, on the engine thread, which has nothing else to do) is paid once. Where the C library
has no `malloc_trim` (musl, macOS), nothing happens.

Under load the opposite: glibc trims on its own. Its defaults serve a block above 128 KiB with mmap and
unmap it when freed (the threshold only adapts upward as such blocks are freed), and give the top of a
heap back once 128 KiB of it is free (twice the adapted threshold later). A forward's activations are
megabytes each ([16 rows x 128 tokens, 1536] = 12.6 MB in SmolLM2's MLP), so a new process unmapped them
after every forward and faulted them in again on the next: measured in a fresh process (16 users, 64
requests of 128 prompt + 32 new tokens, one thread), 43k-455k minor page faults per run.
`keep_freed_memory` (EngineSettings.keep_freed_memory, off by default) fixes both thresholds at engine
start (1k-3k faults per run then): blocks up to `MMAP_THRESHOLD` come from the arenas, and up to
`TRIM_THRESHOLD` of free memory stays at the top of a heap while the engine works; `IdleTrim` hands it
back once the load is gone. Why off: in one process it read x1.07 (base), x1.09 (16 LoRAs) and x0.99 (5-kind
mix), medians of six alternated pairs, but through the server beside AIPerf the base ran slower with it in
three alternated pairs of three (x0.55, x0.86, x0.95; docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_TRIM_S = 1.0  # seconds without work before freed memory is handed back
MMAP_THRESHOLD = 32 << 20  # blocks up to this come from the arenas: the most every glibc accepts
TRIM_THRESHOLD = 1 << 30  # free memory a heap keeps at its top under load (IdleTrim returns it when idle)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    function = getattr(_libc(), "malloc_trim", None)
    if function is None:
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process; see above) so that what a forward frees
    is reused by the next instead of unmapped and faulted in again. False where the C library has no
    `mallopt` or refuses the values (then its defaults stay)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, done)
    return done


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the system (glibc `malloc_trim(0)`). False where the C
    library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class IdleTrim:
    """Calls `release` once per idle period: when `idle()` finds no `worked()` for `idle_s` seconds
    since the last one (engine thread only)."""

    def __init__(
        self,
        idle_s: float = IDLE_TRIM_S,
        release: Callable[[], bool] = release_free_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s, self._release, self._clock = idle_s, release, clock
        self._pending = False  # work was done since the last release
        self._last_work = clock()
        self.releases = 0

    def worked(self) -> None:
        self._pending = True
        self._last_work = self._clock()

    def idle(self) -> bool:
        """Release now if the engine worked and has been idle for `idle_s`; True if it did."""
        if not self._pending or self._clock() - self._last_work < self.idle_s:
            return False
        self._pending = False
        started = self._clock()
        self._release()
        self.releases += 1
        log.debug("idle: freed memory returned to the system in %.1f ms", (self._clock() - started) * 1e3)
        return True
