"""How many CPUs this process may really use: its affinity mask and its cgroup's CPU quota.

`os.cpu_count()` counts the host's CPUs. A container limited with `docker --cpus 2` or Kubernetes
`limits.cpu: 2` on a 64-core host still sees 64; threads sized from that count spin at barriers while
the kernel throttles them (the quota is spent in a fraction of each period, then every thread waits for
the next one). The quota lives in the cgroup: `cpu.max` ("QUOTA PERIOD" or "max PERIOD") on cgroup v2,
`cpu.cfs_quota_us` / `cpu.cfs_period_us` on v1; a quota set on any ancestor applies too, so the
smallest along the path wins. Everything here reads files only and never fails: a file that cannot be
read is a limit that is not there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """affinity: CPUs the scheduler may run this process on; quota: the cgroup's limit in CPUs (None:
    no limit); usable: whole CPUs to size thread pools from (at least 1)."""

    affinity: int
    quota: float | None
    usable: int
    affinity_cpus: tuple[int, ...] = ()

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup CPU quota {self.quota:g}"
        return f"{self.usable} usable CPU(s) ({self.affinity} in the affinity mask, {quota})"


def affinity_cpus() -> tuple[int, ...]:
    """The CPU ids this process may run on."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return tuple(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_v2(text: str | None) -> float | None:
    """cpu.max: "max 100000" (no limit) or "200000 100000" (2 CPUs)."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text: str | None, period_text: str | None) -> float | None:
    """cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us."""
    try:
        quota, period = int(quota_text or "-1"), int(period_text or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(root: Path, relative: str) -> list[Path]:
    """root/relative and each of its parents up to root (a container sees its own cgroup as "/")."""
    parts = [p for p in relative.strip("/").split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup and its ancestors; None if unlimited."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    quotas: list[float] = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, relative = fields
        if controllers == "":  # cgroup v2: "0::/path"
            for directory in _ancestors(root, relative):
                q = _quota_v2(_read(directory / "cpu.max"))
                if q is not None:
                    quotas.append(q)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in {root / controllers, root / "cpu", root / "cpu,cpuacct"}:
                for directory in _ancestors(mount, relative):
                    q = _quota_v1(
                        _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
                    )
                    if q is not None:
                        quotas.append(q)
    return min(quotas) if quotas else None


def cpu_budget(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> CpuBudget:
    """The CPUs this process may use: min(affinity, ceil(quota)), at least 1. A quota of 1.5 CPUs gives
    2 (the half CPU is worth a thread; a fraction below one whole CPU still gets one)."""
    cpus = affinity_cpus()
    quota = cgroup_quota(proc_cgroup, root)
    usable = len(cpus)
    if quota is not None:
        usable = min(usable, max(1, math.ceil(quota - 0.25)))  # 1.2 CPUs -> 1 thread, 1.5 -> 2
    return CpuBudget(affinity=len(cpus), quota=quota, usable=max(1, usable), affinity_cpus=cpus)
