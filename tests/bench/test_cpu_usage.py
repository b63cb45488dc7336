"""The benchmark kit's CPU accounting: a process's CPU seconds and the machine's steal from /proc, and
the usage between two samples as a row describes it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterserve.bench.aiperf_report import Row, format_row
from adapterserve.bench.aiperf_settings import AiperfSettings
from adapterserve.bench.cpu_usage import (
    CpuSample,
    CpuUsage,
    machine_jiffies,
    process_counters,
    sample,
    usage,
)

linux = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")


def _fake_proc(tmp_path: Path, pid: int, utime: int, stime: int, cpu_line: str) -> Path:
    (tmp_path / str(pid)).mkdir(exist_ok=True)
    # comm with a space and a ')' inside: the fields are counted after the last ')'
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "1234", "0", "0", "0", str(utime), str(stime)]
    (tmp_path / str(pid) / "stat").write_text(f"{pid} (python3 a)b) " + " ".join(fields + ["0"] * 30))
    (tmp_path / "stat").write_text(cpu_line + "\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    return tmp_path


def test_process_seconds_and_steal_are_read_from_proc_fields(tmp_path: Path) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    proc = _fake_proc(tmp_path, 42, utime=3 * hz, stime=hz, cpu_line="cpu  100 5 20 800 10 0 5 60 7 0")
    assert process_counters(42, proc) == (pytest.approx(4.0), 1234)  # CPU seconds, minor faults
    assert process_counters(43, proc) is None  # gone: unknown, not an error
    assert machine_jiffies(proc) == (60, 100 + 5 + 20 + 800 + 10 + 0 + 5 + 60)


def test_usage_between_samples_takes_the_client_the_caller_names() -> None:
    before = CpuSample(10.0, server=5.0, server_faults=500, children=1.0, own=2.0, steal=100, total=10_000)
    after = CpuSample(
        60.0, server=70.0, server_faults=12_900, children=31.0, own=4.5, steal=300, total=20_000
    )
    aiperf = usage(before, after, client="children")
    assert aiperf == CpuUsage(wall_s=50.0, server_s=65.0, client_s=30.0, steal_pct=2.0, server_faults=12_400)
    assert aiperf.describe() == "server 65.0 / client 30.0 CPU-s in 50.0 s, steal 2.0%, server faults 12k"
    assert usage(before, after, client="own").client_s == 2.5
    unknown = usage(
        CpuSample(0.0, None, None, 0.0, 0.0, None, None), CpuSample(1.0, 3.0, 7, 0.0, 0.0, None, None), "own"
    )
    assert unknown.describe() == "server ? / client 0.0 CPU-s in 1.0 s, steal ?, server faults ?"
    with pytest.raises(ValueError, match="client must be"):
        usage(before, after, client="server")


def test_a_row_shows_its_cpu_usage() -> None:
    row = Row("lora", "AIPerf", 82.46, 1731.0, 142.2, 191.7, 0)
    row.cpu = CpuUsage(wall_s=52.0, server_s=61.2, client_s=38.5, steal_pct=0.3, server_faults=268_000)
    line = format_row(row, AiperfSettings(aiperf="aiperf", label="default"))
    assert line.endswith("| — | server 61.2 / client 38.5 CPU-s in 52.0 s, steal 0.3%, server faults 268k |")


@linux
def test_a_busy_server_and_a_busy_client_are_told_apart() -> None:
    """A child that burns ~0.6 s of CPU shows as the server (by pid) and, once waited for, as the
    client (this process's children); an idle wall second adds to neither."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    server = subprocess.Popen([sys.executable, "-c", burn + "import time; time.sleep(30)"])
    try:
        before = sample(server.pid)
        time.sleep(0.1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            counters = process_counters(server.pid)
            if counters is not None and counters[0] >= 0.6:
                break
            time.sleep(0.05)
        subprocess.run([sys.executable, "-c", burn], check=True)  # the "client", waited for
        got = usage(before, sample(server.pid), client="children")
    finally:
        server.kill()
        server.wait()
    assert got.server_s is not None and 0.4 <= got.server_s <= 5.0
    assert got.server_faults is not None and got.server_faults >= 0
    assert 0.5 <= got.client_s <= 5.0
    assert got.steal_pct is not None and 0.0 <= got.steal_pct <= 100.0
