"""The AIPerf bench kit reads AIPerf's report and the server log as a user would read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterserve.bench.aiperf import (
    HEADER,
    AiperfSettings,
    Server,
    aiperf_row,
    format_row,
    parse_settings,
    run_aiperf,
)


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


def _fake_aiperf(tmp_path: Path, exit_code: int, writes_export: bool) -> str:
    """An `aiperf` stand-in: writes a report into --output-artifact-dir (or not) and exits `exit_code`."""
    report = {
        "output_token_throughput": {"avg": 42.7},
        "time_to_first_token": {"p50": 2900.0},
        "inter_token_latency": {"p50": 310.0, "p99": 450.0},
    }
    script = tmp_path / "aiperf"
    write = (
        'mkdir -p "$out" && printf %s \'' + json.dumps(report) + '\' > "$out/profile_export_aiperf.json"'
        if writes_export
        else ":"
    )
    script.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --output-artifact-dir ] && out=$2; shift; done\n'
        f"{write}\necho 'DEGRADED: 1 result producer(s) died before reporting'\nexit {exit_code}\n"
    )
    script.chmod(0o755)
    return str(script)


def test_an_aiperf_that_exits_non_zero_after_writing_its_records_still_gives_a_row(tmp_path: Path) -> None:
    settings = AiperfSettings(aiperf=_fake_aiperf(tmp_path, 1, writes_export=True), label="before")
    report = run_aiperf(settings, ["base"], "tok", "http://127.0.0.1:1", tmp_path / "run")
    row = aiperf_row("base", report)
    assert row.tokens_per_s == 42.7 and row.note == "aiperf exit 1"
    assert format_row(row, settings).endswith("| — (aiperf exit 1) |")


def test_an_aiperf_that_fails_without_records_is_an_error_naming_its_log(tmp_path: Path) -> None:
    settings = AiperfSettings(aiperf=_fake_aiperf(tmp_path, 2, writes_export=False))
    with pytest.raises(RuntimeError, match=r"aiperf exited 2 without results; see .*run\.log"):
        run_aiperf(settings, ["base"], "tok", "http://127.0.0.1:1", tmp_path / "run")


def test_the_light_client_can_run_alone_and_aiperf_is_needed_otherwise(capsys) -> None:
    alone = parse_settings(["--no-aiperf", "--scenarios", "base"])
    assert (alone.run_aiperf, alone.light_client, alone.scenarios) == (False, True, ("base",))
    for argv, message in (
        (["--no-aiperf", "--no-light-client"], "leaves nothing to run"),
        (["--scenarios", "base"], "--aiperf is required"),
    ):
        with pytest.raises(SystemExit):
            parse_settings(argv)
        assert message in capsys.readouterr().err
    assert parse_settings(["--aiperf", "/bin/aiperf"]).run_aiperf
