"""OpenMP thread pools on a CPU: keep the engine thread's pool the only one.

Torch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels). libgomp keeps a pool of worker
threads for every thread that has run a parallel region, for the life of that thread. Once the pools
together hold more threads than the process may use CPUs, libgomp stops spin-waiting at every barrier
and sleeps instead ("throttled" spinning), so every parallel region of every pool pays futex wake-ups.
The server loads the base model and parses adapters on worker threads and runs the engine on a thread of
its own: two or more pools, and on the 2-core development machine the engine thread's decode step took
205 ms instead of 165 ms (17% of served throughput, the serving path's whole measured cost).

`release_openmp_pool()` frees the calling thread's pool (OpenMP 5.0 `omp_pause_resource_all` with
`omp_pause_hard`, which libgomp >= 9 implements for the calling thread only); the thread gets a new pool
if it runs a parallel region again. Only libgomp is called: LLVM's and Intel's runtimes take a hard pause
as a shutdown of the whole runtime, unsafe while the engine thread runs. `run_releasing_pool` wraps work
that runs torch ops off the engine thread, so the pool it created goes away with the work. Where libgomp
is not loaded (other builds, other systems), both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_OMP_PAUSE_HARD = 2
_RUNTIME_NAME = "libgomp"


@functools.cache
def _runtime_function(name: str) -> Callable[[int], int] | None:
    """The function `name` (int -> int) of the OpenMP runtime torch loaded (libgomp), or None."""
    import torch  # noqa: F401  (loads the OpenMP runtime torch links)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _RUNTIME_NAME in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            function = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    return None


def _pause_all() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the OpenMP runtime torch loaded, or None."""
    return _runtime_function("omp_pause_resource_all")


def set_thread_threads(threads: int) -> None:
    """The calling thread's intra-op thread count, and only its own. `torch.set_num_threads` also sets
    the count that every thread started later begins with (torch's process default, read once per
    thread), so a prefill worker setting its one thread would leave new threads (a model load, an
    adapter parse) with one too. OpenMP's own call changes this thread's count alone."""
    import torch

    torch.get_num_threads()  # torch's once-per-thread set-up first: it would override the count below
    setter = _runtime_function("omp_set_num_threads")
    if setter is None:  # not libgomp: torch's call (which also moves the process default)
        torch.set_num_threads(threads)
    elif torch.get_num_threads() != threads:
        setter(threads)


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker threads. True if a runtime took the call."""
    pause = _pause_all()
    if pause is None:
        return False
    return pause(_OMP_PAUSE_HARD) == 0


def releasing_pool(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, then (even if it raises) release the OpenMP pool of the thread that ran it."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_openmp_pool()

    return run


async def run_releasing_pool(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread(fn, ...)` for work that runs torch ops (loading a model, parsing adapters):
    the worker thread's OpenMP pool is released when the work ends."""
    return await asyncio.to_thread(releasing_pool(fn), *args, **kwargs)
