"""The OpenMP pool of a thread that ran torch ops off the engine thread is freed when asked (cpu/omp_pools.py):
its worker threads leave the process, and torch keeps working in that thread afterwards."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from adapterserve.server.cpu.omp_pools import release_openmp_pool, releasing_pool, run_releasing_pool


def _threads() -> set[int]:
    """The process's thread ids. Compared as sets, not counted: a thread that another test left starting
    or ending at the same moment must not pass for (or hide) the pool's worker threads."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def _parallel_work() -> torch.Tensor:
    x = torch.arange(1 << 21, dtype=torch.float32)
    return (x * 0.5).sin().sum()  # large enough for torch to run it on the OpenMP pool


needs_pool = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2 or not release_openmp_pool(),
    reason="needs Linux, 2+ torch threads and an OpenMP runtime with omp_pause_resource_all",
)


@needs_pool
def test_a_released_pool_leaves_the_process_and_torch_still_works():
    seen = {}

    def worker() -> None:
        seen["before"] = _threads()
        seen["value"] = _parallel_work()
        seen["with_pool"] = _threads()
        seen["released"] = release_openmp_pool()
        seen["after"] = _threads()
        seen["again"] = _parallel_work()  # a new pool, same result
        release_openmp_pool()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    pool = seen["with_pool"] - seen["before"]
    assert pool, "the parallel op ran without a pool of worker threads"
    assert seen["released"] and not pool & seen["after"], "the pool's threads are still there"
    assert torch.equal(seen["value"], seen["again"])


@needs_pool
def test_releasing_pool_frees_it_even_when_the_work_fails():
    counts: dict[str, set[int]] = {}

    def failing() -> None:
        counts["before"] = _threads()
        _parallel_work()
        counts["with_pool"] = _threads()
        raise ValueError("bad adapter")

    def worker() -> None:
        with pytest.raises(ValueError, match="bad adapter"):
            releasing_pool(failing)()
        counts["after"] = _threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    pool = counts["with_pool"] - counts["before"]
    assert pool, "the parallel op ran without a pool of worker threads"
    assert not pool & counts["after"], "the pool's threads are still there"


def test_run_releasing_pool_returns_the_result():
    assert asyncio.run(run_releasing_pool(lambda a, b=0: a + b, 2, b=3)) == 5


@needs_pool
def test_a_prefill_worker_runs_on_one_thread_and_new_threads_keep_the_process_default():
    """A prefill worker's one intra-op thread is its own: threads started after it (a model load, an
    adapter parse) still begin with the process's count, and so does the thread that started it."""
    from adapterserve.server.cpu.prefill_workers import PrefillWorkers

    default = torch.get_num_threads()
    workers = PrefillWorkers(2)
    try:
        inside = workers.submit(torch.get_num_threads).result(10)
    finally:
        workers.close()
    later: dict[str, int] = {}
    thread = threading.Thread(target=lambda: later.update(threads=torch.get_num_threads()))
    thread.start()
    thread.join()
    assert inside == 1 and default >= 2
    assert later["threads"] == default and torch.get_num_threads() == default
