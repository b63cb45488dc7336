"""Where a benchmark run's CPU time went: the server process's (and its page faults), the load
client's, and what the hypervisor took from this VM (steal), read from /proc around the run (Linux;
elsewhere the server's and the steal figures are unknown).

Why: on a shared 2-core machine one run of a workload can be 25% slower than the next with nothing
changed (docs/performance.md). Whether the server then got less CPU (the client took more, or the host
took it) or the same CPU and did less with it tells which of the two to chase.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class CpuSample:
    """One instant: wall clock, CPU seconds and minor page faults of the server, CPU seconds of this
    process's children and of this process, and the machine's jiffies (all CPUs) in total and stolen by
    the hypervisor."""

    wall: float
    server: float | None
    server_faults: int | None
    children: float
    own: float
    steal: int | None
    total: int | None


@dataclass(frozen=True)
class CpuUsage:
    """Between two samples: seconds of wall clock, the server's and the client's CPU seconds, the
    server's minor page faults, and the share of all CPUs' time the hypervisor stole (percent)."""

    wall_s: float
    server_s: float | None
    client_s: float
    steal_pct: float | None
    server_faults: int | None = None

    def describe(self) -> str:
        """`server 61.2 / client 38.5 CPU-s in 52.0 s, steal 0.3%, server faults 12k`."""
        server = "?" if self.server_s is None else f"{self.server_s:.1f}"
        steal = "?" if self.steal_pct is None else f"{self.steal_pct:.1f}%"
        faults = "?" if self.server_faults is None else f"{self.server_faults / 1000:.0f}k"
        return (
            f"server {server} / client {self.client_s:.1f} CPU-s in {self.wall_s:.1f} s, steal {steal}, "
            f"server faults {faults}"
        )


def process_counters(pid: int, proc: Path = _PROC) -> tuple[float, int] | None:
    """(utime + stime in seconds, minor page faults) of every thread of `pid`, from /proc/PID/stat;
    None when it cannot be read."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces and ')'
    minflt, utime, stime = int(fields[7]), int(fields[11]), int(fields[12])  # fields 10, 14, 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK"), minflt


def machine_jiffies(proc: Path = _PROC) -> tuple[int, int] | tuple[None, None]:
    """(steal, total) jiffies over all CPUs since boot, from /proc/stat's `cpu` line."""
    try:
        first = (proc / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None, None
    if first[0] != "cpu" or len(first) < 9:
        return None, None
    # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
    values = [int(v) for v in first[1:9]]
    return values[7], sum(values)


def sample(server_pid: int | None, proc: Path = _PROC) -> CpuSample:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    steal, total = machine_jiffies(proc)
    server = None if server_pid is None else process_counters(server_pid, proc)
    return CpuSample(
        wall=time.monotonic(),
        server=None if server is None else server[0],
        server_faults=None if server is None else server[1],
        children=children.ru_utime + children.ru_stime,
        own=own.ru_utime + own.ru_stime,
        steal=steal,
        total=total,
    )


def usage(before: CpuSample, after: CpuSample, client: str) -> CpuUsage:
    """The usage between two samples; the client is this process's waited-for children (`children`:
    AIPerf and its workers) or this process itself (`own`: the light client's threads)."""
    if client not in ("children", "own"):
        raise ValueError(f"client must be 'children' or 'own', not {client!r}")
    server = faults = None
    if before.server is not None and after.server is not None:
        server = after.server - before.server
    if before.server_faults is not None and after.server_faults is not None:
        faults = after.server_faults - before.server_faults
    steal_pct = None
    if before.total is not None and after.total is not None and after.total > before.total:
        assert before.steal is not None and after.steal is not None
        steal_pct = 100.0 * (after.steal - before.steal) / (after.total - before.total)
    client_s = after.children - before.children if client == "children" else after.own - before.own
    return CpuUsage(after.wall - before.wall, server, client_s, steal_pct, faults)
