"""The AIPerf bench kit reads AIPerf's report and the server log as a user would read them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from adapterserve.bench.aiperf import Server, aiperf_row, run, run_aiperf
from adapterserve.bench.aiperf_report import (
    HEADER,
    SUMMARY_HEADER,
    VARIANT_HEADER,
    Row,
    format_row,
    summary,
    variant_summary,
)
from adapterserve.bench.aiperf_settings import AiperfSettings, parse_settings


def test_a_report_becomes_a_table_row() -> None:
    report = {
        "output_token_throughput": {"unit": "tokens/sec", "avg": 82.46},
        "time_to_first_token": {"p50": 1731.0, "max": 5120.0},
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
    assert line == "| default | lora | AIPerf | 82.5 | 1.73 s | 5.12 s | 142 | 192 | 2 | — | — |"
    assert line.count("|") == HEADER.splitlines()[0].count("|")


def test_the_governor_column_lists_thread_changes_not_the_start_up_plan(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "INFO wiring: CPU threads: 2 (usable CPUs); wait policy: libgomp default; contention governor: on; ...\n"
        "INFO cpu_governor: CPU contention governor: 2 -> 1 engine thread(s) (our threads waiting ...)\n"
        "INFO decode_pacing: decode pacing on (a decode step beside prefills every 100 ms at most): ...\n"
        "INFO cpu_governor: CPU contention governor: 1 -> 2 engine thread(s) (our threads waiting ...)\n"
        "INFO decode_pacing: decode pacing off: the engine was idle; the next load is judged afresh\n"
    )
    server = Server.__new__(Server)  # only the log is read
    server.log_path = log
    assert server.governor_changes() == "2->1, paced, 1->2, unpaced"


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
    assert format_row(row, settings).endswith("| — (aiperf exit 1) | — |")


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


def _row(scenario: str, client: str, tps: float, round_: int, itl: float | None = None) -> Row:
    return Row(scenario, client, tps, 1500.0, itl, None if itl is None else itl + 50, 0, round=round_)


def test_rounds_run_interleaved_and_a_summary_gives_medians_and_same_round_ratios(monkeypatch) -> None:
    settings = parse_settings(["--aiperf", "/bin/aiperf", "--scenarios", "base,mixed", "--rounds", "3"])
    calls: list[tuple[str, int]] = []
    tps = {("base", 1): 80.0, ("mixed", 1): 76.0, ("base", 2): 100.0, ("mixed", 2): 80.0}
    tps |= {("base", 3): 90.0, ("mixed", 3): 90.0}

    def fake(settings, scenario, round_, model_dir, variant=""):
        calls.append((scenario, round_))
        return [_row(scenario, "AIPerf", tps[(scenario, round_)], round_, itl=100.0 + round_)]

    monkeypatch.setattr("adapterserve.bench.aiperf.run_scenario", fake)
    rows = run(settings)
    # a slow drift of a shared machine hits every workload alike
    assert calls == [("base", 1), ("mixed", 1), ("base", 2), ("mixed", 2), ("base", 3), ("mixed", 3)]
    assert format_row(rows[1], settings).startswith("| shared (round 1) | mixed | AIPerf | 76.0 |")
    lines = summary(rows).splitlines()
    assert lines[:2] == SUMMARY_HEADER.splitlines()
    assert lines[2] == "| base | AIPerf | 3 | 90.0 (80.0-100.0) | — | 102 | 152 | 0 |"
    # mixed/base in the same round: 0.95, 0.80, 1.00 (not the ratio of the medians, 80/90)
    assert lines[3] == "| mixed | AIPerf | 3 | 80.0 (76.0-90.0) | x0.95 (0.95, 0.80, 1.00) | 102 | 152 | 0 |"


def test_the_summary_keeps_clients_apart_and_needs_a_base_for_ratios() -> None:
    rows = [
        _row("base", "AIPerf", 80.0, 1, itl=120.0),
        _row("base", "light (openai pkg)", 120.0, 1),
        _row("lora", "AIPerf", 72.0, 1, itl=130.0),
        _row("lora", "light (openai pkg)", 126.0, 1),
    ]
    lines = summary(rows).splitlines()[2:]
    assert lines[2] == "| lora | AIPerf | 1 | 72.0 (72.0-72.0) | x0.90 (0.90) | 130 | 180 | 0 |"
    assert lines[3] == "| lora | light (openai pkg) | 1 | 126.0 (126.0-126.0) | x1.05 (1.05) | — | — | 0 |"
    no_base = summary([_row("lora", "AIPerf", 72.0, 1)]).splitlines()[2]
    assert no_base == "| lora | AIPerf | 1 | 72.0 (72.0-72.0) | — | — | — | 0 |"


def test_rounds_must_be_at_least_one(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--aiperf", "/bin/aiperf", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_the_shared_prefix_workload_sends_aiperf_shared_prefixes(tmp_path: Path) -> None:
    settings = parse_settings(["--aiperf", "x", "--workload", "shared-prefix", "--requests", "40"])
    assert (settings.input_tokens, settings.output_tokens, settings.concurrency) == (64, 16, 8)
    assert (settings.prefix_prompts, settings.prefix_length, settings.requests) == (4, 512, 40)
    args = tmp_path / "args"
    script = tmp_path / "aiperf"
    script.write_text(f'#!/bin/sh\necho "$@" > {args}\nexit 3\n')
    script.chmod(0o755)
    settings.aiperf = str(script)
    with pytest.raises(RuntimeError):
        run_aiperf(settings, ["base"], "tok", "http://127.0.0.1:1", tmp_path / "run")
    sent = args.read_text()
    assert "--num-prefix-prompts 4 --prefix-prompt-length 512" in sent
    assert "--prompt-input-tokens-mean 64" in sent and "--request-count 40" in sent
    chats = parse_settings(["--aiperf", str(script), "--workload", "multi-turn"])
    with pytest.raises(RuntimeError):
        run_aiperf(chats, ["base"], "tok", "http://127.0.0.1:1", tmp_path / "chats")
    sent = args.read_text()
    assert "--endpoint-type chat" in sent and "--conversation-num 24 --conversation-turn-mean 4" in sent
    assert "--num-prefix-prompts" not in sent


def test_variants_run_interleaved_on_one_machine_and_compare_with_the_first(monkeypatch) -> None:
    argv = ["--aiperf", "x", "--scenarios", "base", "--rounds", "2", "--no-light-client"]
    settings = parse_settings([*argv, "--variant", "workers=", "--variant", "inline=--cpu-prefill-threads 0"])
    assert settings.variants == [("workers", []), ("inline", ["--cpu-prefill-threads", "0"])]
    calls: list[tuple[str, int, list[str]]] = []
    figures = {("workers", 1): (7.0, 7000.0, 200000.0), ("inline", 1): (8.4, 3500.0, 14000.0)}
    figures |= {("workers", 2): (7.5, 7200.0, 210000.0), ("inline", 2): (9.0, 3600.0, 12600.0)}

    def fake(settings, scenario, round_, model_dir, variant=""):
        calls.append((variant, round_, settings.server_args))
        tps, p50, worst = figures[(variant, round_)]
        return [Row(scenario, "AIPerf", tps, p50, None, None, 0, ttft_max_ms=worst, round=round_)]

    monkeypatch.setattr("adapterserve.bench.aiperf.run_scenario", fake)
    rows = run(settings)
    assert calls == [
        ("workers", 1, []),
        ("inline", 1, ["--cpu-prefill-threads", "0"]),
        ("workers", 2, []),
        ("inline", 2, ["--cpu-prefill-threads", "0"]),
    ]
    assert format_row(rows[1], settings).startswith("| inline (round 1) | base | AIPerf | 8.4 | 3.50 s | 14.00 s |")
    lines = variant_summary(rows).splitlines()
    assert lines[:2] == VARIANT_HEADER.splitlines()
    # same-round ratios: 1.20 and 1.20; 0.50 and 0.50; 0.07 and 0.06 (median 0.065)
    assert lines[2] == "| inline vs workers | base | AIPerf | 2 | x1.20 | x0.50 | x0.07 |"
    with pytest.raises(SystemExit):
        parse_settings([*argv, "--variant", "no-equals-sign"])


def test_a_variant_runs_its_server_under_another_python(monkeypatch, tmp_path) -> None:
    """--variant-python: the code before and after a change, one server each, interleaved in one run."""
    argv = ["--aiperf", "x", "--scenarios", "base", "--no-light-client", "--variant", "before=", "--variant"]
    settings = parse_settings([*argv, "after=", "--variant-python", "before=/old/venv/bin/python"])
    assert settings.variant_pythons == {"before": "/old/venv/bin/python"}
    seen: list[tuple[str, str]] = []

    def fake(settings, scenario, round_, model_dir, variant=""):
        seen.append((variant, settings.server_python))
        return []

    monkeypatch.setattr("adapterserve.bench.aiperf.run_scenario", fake)
    run(settings)
    assert seen == [("before", "/old/venv/bin/python"), ("after", "")]
    popen: list[list[str]] = []
    monkeypatch.setattr("subprocess.Popen", lambda cmd, **kw: popen.append(cmd))
    Server(dataclasses.replace(settings, server_python="/old/venv/bin/python"), tmp_path / "server.log")
    assert popen[0][:4] == ["/old/venv/bin/python", "-m", "adapterserve", "serve"]
    for bad in (["--variant-python", "nobody=/p"], ["--variant-python", "before"]):
        with pytest.raises(SystemExit):
            parse_settings([*argv, "after=", *bad])
