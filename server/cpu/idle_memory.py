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

Under load nothing is trimmed by hand: glibc's own thresholds apply (blocks above 128 KiB are mmapped
and unmapped when freed, so a new process may fault a forward's activations in again on the next one).
Fixing the thresholds at engine start removed those faults but did not make the server faster: in one
process x1.07 (base), x1.09 (16 LoRAs) and x0.99 (5-kind mix), medians of six alternated pairs inside
the machine's noise, and beside AIPerf slower in three pairs (x0.55, x0.86, x0.95); so the engine keeps
glibc's defaults.
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
