"""The real server sizes its CPU threads from what it may use, runs prefill on worker threads beside its
decode steps, and sheds threads beside busy processes (server/cpu/threads.py,
server/cpu/prefill_workers.py, server/cpu/governor.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapterserve import Client
from adapterserve.server.cpu.budget import affinity_cpus
from tests.helpers.server_process import start_server

PLAN = re.compile(r"CPU threads: (?P<threads>\d+) \((?P<source>[^)]*)\)")
SHED = re.compile(r"CPU contention governor: (?P<before>\d+) -> (?P<after>\d+) engine thread")
# The governor's tests run prefill inline (every step on the engine's OpenMP threads, which the governor
# sizes); with prefill workers (the default on 2+ CPUs) it sizes only the decode steps that run alone.
INLINE = ["--cpu-prefill-threads", "0"]
WORKERS = re.compile(r"prefill on (?P<workers>\d+) worker thread")
BUSY = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end:\n    pass\n"


def _busy_processes(n: int, nice: int = 0) -> list[subprocess.Popen]:
    """n single-threaded spinners at `nice` (ended by the test, or after 120 s at most)."""
    return [
        subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=lambda: os.nice(nice)) for _ in range(n)
    ]


@pytest.mark.skipif(len(affinity_cpus()) < 2, reason="one CPU: there is no thread to shed")
def test_in_its_own_session_beside_busy_processes_the_server_sheds_threads_and_keeps_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cpus = len(affinity_cpus())
    server = start_server(
        tiny_model_dir, tmp_path / "store", extra_args=INLINE, unset_env=["OMP_NUM_THREADS"], new_session=True
    )
    busy: list[subprocess.Popen] = []
    try:
        plan = server.wait_for(PLAN, 5)
        assert (int(plan["threads"]), plan["source"]) == (cpus, "usable CPUs")
        busy = _busy_processes(cpus)
        served = 0
        deadline = time.monotonic() + 60
        with Client(server.target) as client:
            while not SHED.search(server.log_text()) and time.monotonic() < deadline:
                reply = client.generate("def add(a, b):", max_new_tokens=48, ignore_eos=True)
                assert len(reply.token_ids) == 48
                served += 1
        shed = SHED.search(server.log_text())
        assert shed is not None, f"no thread shed after {served} requests beside {cpus} busy processes"
        assert int(shed["after"]) < int(shed["before"]) == cpus
    finally:
        for p in busy:
            p.kill()
            p.wait()
        assert server.stop() == 0


def _cgroup_with_quota(cpus: float) -> Path | None:
    """A writable cgroup with a CPU quota (v1 or v2), or None where this process cannot make one."""
    name = f"adapterserve-test-{os.getpid()}"
    for root, v1 in ((Path("/sys/fs/cgroup/cpu"), True), (Path("/sys/fs/cgroup"), False)):
        marker = root / ("cpu.cfs_quota_us" if v1 else "cgroup.controllers")
        if not marker.exists():
            continue
        group = root / name
        try:
            group.mkdir(exist_ok=True)
            if v1:
                period = int((group / "cpu.cfs_period_us").read_text())
                (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
            else:
                (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def test_under_a_cpu_quota_the_server_runs_the_quota_s_threads(tiny_model_dir: Path, tmp_path: Path) -> None:
    group = _cgroup_with_quota(1.0)
    if group is None:
        pytest.skip("cannot create a cgroup with a CPU quota here (needs root and a writable cgroup fs)")
    procs = group / "cgroup.procs"
    try:
        server = start_server(
            tiny_model_dir,
            tmp_path / "store",
            unset_env=["OMP_NUM_THREADS"],
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
        )
        try:
            plan = server.wait_for(PLAN, 5)
            assert (int(plan["threads"]), plan["source"]) == (1, "usable CPUs")
            assert "cgroup CPU quota 1" in server.log_text()
            with Client(server.target) as client:
                assert (
                    len(client.generate("def add(a, b):", max_new_tokens=8, ignore_eos=True).token_ids) == 8
                )
        finally:
            assert server.stop() == 0
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


def _serve_until(
    server, client: Client, pattern: re.Pattern[str], after: int, seconds: float
) -> re.Match | None:
    """Keep the engine busy without a pause (2 callers, each calling again at once) until the log shows
    `pattern` past character `after`, or `seconds` pass; returns the match."""
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def found() -> re.Match | None:
        return pattern.search(server.log_text(), after)

    def caller() -> None:
        try:
            while found() is None and time.monotonic() < deadline and not errors:
                reply = client.generate("def add(a, b):", max_new_tokens=96, ignore_eos=True)
                assert len(reply.token_ids) == 96
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    if errors:
        raise errors[0]
    return found()


@pytest.mark.skipif(len(affinity_cpus()) < 2, reason="one CPU: there is no thread to shed")
def test_beside_low_priority_work_the_canary_brings_the_shed_thread_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Spinners at our priority take a thread away; when they give way to spinners at nice 19 (busy CPUs
    that yield), the governor's canary sees a CPU free for the asking and the thread comes back."""
    cpus = len(affinity_cpus())
    server = start_server(
        tiny_model_dir, tmp_path / "store", extra_args=INLINE, unset_env=["OMP_NUM_THREADS"]
    )
    busy: list[subprocess.Popen] = []
    back = re.compile(rf"governor: {cpus - 1} -> {cpus} engine thread\(s\), the canary got a CPU")
    try:
        server.wait_for(PLAN, 5)
        busy = _busy_processes(cpus)
        with Client(server.target) as client:
            shed = _serve_until(server, client, SHED, 0, 60)
            assert shed is not None and int(shed["after"]) == cpus - 1, "no thread shed beside busy processes"
            for p in busy:
                p.kill()
                p.wait()
            busy = _busy_processes(cpus, nice=19)
            returned = _serve_until(server, client, back, shed.end(), 120)
        assert returned is not None, (
            "the thread did not come back beside nice'd work:\n" + server.log_text()[-3000:]
        )
    finally:
        for p in busy:
            p.kill()
            p.wait()
        assert server.stop() == 0


@pytest.mark.skipif(len(affinity_cpus()) < 2, reason="one CPU: prefill stays inline")
def test_beside_busy_processes_prefill_workers_serve_concurrent_requests_as_they_serve_each_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The default on 2+ CPUs: prefill on worker threads while the engine thread decodes. Requests that
    arrive together (prefills beside decode steps, rows joining mid-flight) give the tokens each gives
    alone, beside busy processes at our priority."""
    cpus = len(affinity_cpus())
    server = start_server(tiny_model_dir, tmp_path / "store", unset_env=["OMP_NUM_THREADS"])
    busy: list[subprocess.Popen] = []
    prompts = [f"def f{i}(x):" + " return x" * i for i in range(6)]
    try:
        plan = server.wait_for(WORKERS, 5)
        assert int(plan["workers"]) == cpus // 2
        with Client(server.target) as client:
            alone = [client.generate(p, max_new_tokens=24, ignore_eos=True).token_ids for p in prompts]
            busy = _busy_processes(cpus)
            together: list[list[int] | None] = [None] * len(prompts)

            def ask(i: int) -> None:
                together[i] = client.generate(prompts[i], max_new_tokens=24, ignore_eos=True).token_ids

            callers = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in callers:
                t.start()
            for t in callers:
                t.join(120)
        assert together == alone
        if Path(f"/proc/{server.proc.pid}/task").is_dir():  # top -H / ps -L tell its threads apart
            names = {
                (t / "comm").read_text().strip() for t in Path(f"/proc/{server.proc.pid}/task").iterdir()
            }
            assert {"as-engine", "as-prefill-0"} <= names
    finally:
        for p in busy:
            p.kill()
            p.wait()
        assert server.stop() == 0
