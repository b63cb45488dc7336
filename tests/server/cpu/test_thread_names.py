"""The server's long-lived threads carry their names to the kernel (top -H, ps -L, /proc/.../comm)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from adapterserve.server.cpu.prefill_workers import PrefillWorkers
from adapterserve.server.cpu.thread_names import kernel_name

needs_proc = pytest.mark.skipif(not Path("/proc/thread-self/comm").exists(), reason="no /proc/thread-self")


def test_kernel_names_are_short_and_recognisable():
    assert kernel_name("adapterserve-engine") == "as-engine"
    assert kernel_name("adapterserve-prefill-3") == "as-prefill-3"
    assert kernel_name("adapterserve-cpu-canary") == "as-cpu-canary"
    assert len(kernel_name("adapterserve-a-very-long-thread-name").encode()) == 15


def _task_names() -> set[str]:
    names = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:
            pass  # a thread that ended meanwhile
    return names


@needs_proc
def test_prefill_workers_show_their_names_to_the_kernel():
    workers = PrefillWorkers(2)
    both_running = threading.Barrier(2, timeout=10)  # one job on each worker at once

    def own_name() -> str:
        both_running.wait()
        return Path("/proc/thread-self/comm").read_text().strip()

    try:
        jobs = [workers.submit(own_name) for _ in range(2)]
        assert sorted(job.result(10) for job in jobs) == ["as-prefill-0", "as-prefill-1"]
        assert {"as-prefill-0", "as-prefill-1"} <= _task_names()  # as ps -L / top -H list them
    finally:
        workers.close()
