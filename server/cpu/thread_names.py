"""Our threads' names as the kernel sees them (top -H, ps -L, perf, /proc/<pid>/task/<tid>/comm).

Python names a thread for itself only; the kernel keeps the process's name ("python") for all of them, so
telling which thread burns the CPU (the engine's decode steps, a prefill worker, the CPU canary) took
py-spy. On Linux each of our long-lived threads gives the kernel its name when it starts, shortened to the
kernel's 15 bytes: "adapterserve-engine" shows as "as-engine", "adapterserve-prefill-0" as "as-prefill-0".
"""

from __future__ import annotations

import threading

KERNEL_NAME_BYTES = 15  # TASK_COMM_LEN - 1


def kernel_name(name: str) -> str:
    """`name` as the kernel will show it: "adapterserve-" -> "as-", at most 15 bytes."""
    return name.replace("adapterserve-", "as-", 1).encode()[:KERNEL_NAME_BYTES].decode(errors="ignore")


def name_this_thread() -> None:
    """Give the calling thread's Python name to the kernel (Linux; elsewhere, or if refused, nothing)."""
    try:
        with open("/proc/thread-self/comm", "w") as comm:
            comm.write(kernel_name(threading.current_thread().name))
    except OSError:
        pass
