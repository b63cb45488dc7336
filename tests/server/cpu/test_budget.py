"""The CPUs the server sizes its threads from: affinity and the cgroup quota (v1 and v2, on ancestors too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterserve.server.cpu import budget as budget_module
from adapterserve.server.cpu.budget import cgroup_quota, cpu_budget
from adapterserve.server.cpu.threads import plan_threads


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_group(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    _write(tmp_path / "fs/kubepods/pod1/ctr/cpu.max", "150000 100000\n")
    assert cgroup_quota(tmp_path / "proc", tmp_path / "fs") == 1.5


def test_cgroup_v2_the_smallest_quota_on_the_path_wins(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/a/b\n")
    _write(tmp_path / "fs/a/b/cpu.max", "max 100000\n")
    _write(tmp_path / "fs/a/cpu.max", "50000 100000\n")
    _write(tmp_path / "fs/cpu.max", "400000 100000\n")
    assert cgroup_quota(tmp_path / "proc", tmp_path / "fs") == 0.5


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    _write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path / "proc", tmp_path / "fs") == 2.0


def test_no_quota_and_unreadable_files_are_no_limit(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/\n1:cpu:/\n")
    _write(tmp_path / "fs/cpu.max", "max 100000\n")
    _write(tmp_path / "fs/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "fs/cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path / "proc", tmp_path / "fs") is None
    assert cgroup_quota(tmp_path / "missing", tmp_path / "fs") is None


@pytest.mark.parametrize(
    ("quota", "cpus", "usable"),
    [(None, 8, 8), (2.0, 8, 2), (1.5, 8, 2), (1.2, 8, 1), (0.5, 8, 1), (16.0, 4, 4)],
)
def test_usable_cpus_are_affinity_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quota: float | None, cpus: int, usable: int
) -> None:
    monkeypatch.setattr(budget_module, "affinity_cpus", lambda: tuple(range(cpus)))
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "fs/cpu.max", "max 100000\n" if quota is None else f"{int(quota * 100000)} 100000\n")
    budget = cpu_budget(tmp_path / "proc", tmp_path / "fs")
    assert (budget.affinity, budget.usable) == (cpus, usable)


def test_thread_plan_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "affinity_cpus", lambda: (0, 1, 2, 3))
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "fs/cpu.max", "200000 100000\n")
    budget = cpu_budget(tmp_path / "proc", tmp_path / "fs")
    default = plan_threads(None, "auto", True, environ={}, budget=budget)
    assert (default.threads, default.governed) == (2, True)  # the quota, not the 4 CPUs of the mask
    assert "2 usable CPU(s)" in default.describe() and "cgroup CPU quota 2" in default.describe()
    from_env = plan_threads(None, "auto", True, environ={"OMP_NUM_THREADS": "3"}, budget=budget)
    assert (from_env.threads, from_env.source, from_env.governed) == (3, "OMP_NUM_THREADS", False)
    explicit = plan_threads(1, "passive", True, environ={"OMP_NUM_THREADS": "3"}, budget=budget)
    assert (explicit.threads, explicit.governed) == (1, False)


def test_prefill_workers_take_half_the_threads_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_module, "affinity_cpus", lambda: (0, 1, 2, 3))
    _write(tmp_path / "proc", "0::/\n")
    budget = cpu_budget(tmp_path / "proc", tmp_path / "fs")
    four = plan_threads(None, "auto", True, environ={}, budget=budget)
    assert (four.threads, four.prefill_threads) == (4, 2)
    assert (
        "prefill on 2 worker thread(s)" in four.describe()
        and "on 2 thread(s) while a prefill runs" in four.describe()
    )
    assert plan_threads(1, "auto", True, environ={}, budget=budget).prefill_threads == 0  # one CPU: inline
    assert plan_threads(2, "auto", True, environ={}, budget=budget).prefill_threads == 1
    inline = plan_threads(None, "auto", True, environ={}, budget=budget, prefill_threads=0)
    assert inline.prefill_threads == 0 and "prefill inline" in inline.describe()


def test_this_process_budget_is_sane() -> None:
    budget = cpu_budget()
    assert 1 <= budget.usable <= budget.affinity == len(budget.affinity_cpus)
