"""The AIPerf bench kit reads AIPerf's report and the server log as a user would read them."""

from __future__ import annotations

from pathlib import Path

from adapterserve.bench.aiperf import HEADER, AiperfSettings, Server, aiperf_row, format_row


def test_a_report_becomes_a_table_row() -> None:
    report = {
        "output_token_throughput": {"unit": "tokens/sec", "avg": 82.46},
        "time_to_first_token": {"p50": 1731.0},
        "inter_token_latency": {"p50": 142.2, "p99": 191.7},
        "error_summary": [{"error_details": {"code": 500}, "count": 2}],
    }
    row = aiperf_row("lora", report)
    assert (row.tokens_per_s, row.ttft_p50_ms, row.itl_p50_ms, row.itl_p99_ms, row.errors) == (
        82.46,
        1731.0,
        142.2,
        191.7,
        2,
    )
    line = format_row(row, AiperfSettings(aiperf="aiperf", label="default"))
    assert line == "| default | lora | AIPerf | 82.5 | 1.73 s | 142 | 192 | 2 | — |"
    assert line.count("|") == HEADER.splitlines()[0].count("|")


def test_the_governor_column_lists_thread_changes_not_the_start_up_plan(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "INFO wiring: CPU threads: 2 (usable CPUs); wait policy: libgomp default; contention governor: on; ...\n"
        "INFO cpu_governor: CPU contention governor: 2 -> 1 engine thread(s) (our threads waiting ...)\n"
        "INFO cpu_governor: CPU contention governor: 1 -> 2 engine thread(s) (our threads waiting ...)\n"
    )
    server = Server.__new__(Server)  # only the log is read
    server.log_path = log
    assert server.governor_changes() == "2->1, 1->2"
