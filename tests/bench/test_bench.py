"""`adapterserve bench` runs end to end on a tiny model: every engine workload warmed, repeated and
interleaved (median and spread), every baseline capped by time, and the edges (one request, one
adapter; a base without a chat template) work."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from adapterserve.bench.cli import add_bench_arguments, run_bench


def _run(tmp_path, model_dir, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(
        ["--base-model", str(model_dir), "--workdir", str(tmp_path / "w"), "--json", str(out), *extra]
    )
    assert run_bench(args) == 0
    return json.loads(out.read_text())


def _without_chat_template(model_dir, tmp_path):
    """A copy of the base whose tokenizer has no chat template (a non-instruct base)."""
    plain = tmp_path / "plain-base"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (plain / extra).unlink(missing_ok=True)
    return plain


def test_bench_reports_engine_and_baselines(tiny_model_dir, tmp_path, capsys):
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "6",
        "--adapters",
        "3",
        "--max-new-tokens",
        "4",
        "--naive-requests",
        "2",
        "--repeats",
        "3",
        "--baseline-seconds",
        "20",
    )
    rows = {r["name"]: r for r in report["results"]}
    base = rows["engine, base only"]
    mixed = rows["engine, 6 requests over 3 lora adapters"]
    for row in (base, mixed):
        assert row["kind"] == "engine" and row["runs"] == 3 and row["tokens"] == 6 * 4
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["decode_step_ms"] > 0 and row["ttft_ms"] > 0
        assert row["bytes_per_decode_step_mib"] > 0  # weights + KV, even where no peak bandwidth is known
        assert "fraction_of_bandwidth_limit" not in row  # a CPU has no datasheet peak unless given
        # each run starts with no cached prefix: a prompt's last position is always computed
        assert 0 <= row["prefix_cache_hit_rate"] < 1
    assert base["vs_base_only"] == 1.0
    assert mixed["vs_base_only_min"] <= mixed["vs_base_only"] <= mixed["vs_base_only_max"]
    names = list(rows)
    assert any("transformers generate" in n for n in names)
    assert any("static batch, 3 LoRAs" in n for n in names) and any("naive PEFT" in n for n in names)
    assert all(not r["capped_by_time"] for r in report["results"] if r["kind"] == "baseline")
    assert report["weight_bytes_per_step_mib"] > 0 and report["kv_cache_mib"] > 0
    assert "tok/s" in capsys.readouterr().out


def test_one_request_over_one_adapter(tiny_model_dir, tmp_path):
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "1",
        "--adapters",
        "1",
        "--max-new-tokens",
        "3",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0",
    )
    assert [r["tokens"] for r in report["results"]] == [3, 3]


def test_a_baseline_is_capped_by_time_and_still_reported(tiny_model_dir, tmp_path):
    """A budget far too small for 200 tokens: every baseline stops early, says so, and reports tokens/s."""
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "2",
        "--adapters",
        "2",
        "--max-new-tokens",
        "200",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0.05",
        "--naive-requests",
        "2",
    )
    baselines = [r for r in report["results"] if r["kind"] == "baseline"]
    assert len(baselines) == 3
    assert all(r["capped_by_time"] for r in baselines)
    assert all(0 < r["tokens"] < 2 * 200 for r in baselines)


def test_a_base_without_chat_template_gets_plain_prompts(tiny_model_dir, tmp_path):
    plain = _without_chat_template(tiny_model_dir, tmp_path)
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(plain).chat_template
    report = _run(
        tmp_path,
        plain,
        "--requests",
        "2",
        "--adapters",
        "1",
        "--max-new-tokens",
        "2",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0",
    )
    assert report["results"][0]["tokens"] == 4


@pytest.mark.parametrize("flag", ["--requests", "--repeats", "--max-new-tokens"])
def test_bad_sizes_are_refused(tiny_model_dir, tmp_path, flag, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--base-model", str(tiny_model_dir), flag, "0"])
    assert run_bench(args) == 2
    assert "at least 1" in capsys.readouterr().out


def test_many_long_context_rows_fit_a_pool_far_below_the_dense_cache(tiny_model_dir, tmp_path, capsys):
    """64 rows of max_seq_len 2048 in a 1 MiB paged pool (the dense cache would take 64 MiB): every request
    completes, and the report says how much of the pool the fullest step held."""
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "64",
        "--adapters",
        "2",
        "--max-new-tokens",
        "4",
        "--max-seq-len",
        "2048",
        "--kv-cache-mib",
        "1",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0",
    )
    assert [r["tokens"] for r in report["results"]] == [64 * 4, 64 * 4]
    kv = report["kv_cache"]
    assert kv["pool_mib"] <= 1.0 < kv["dense_equivalent_mib"] / 32
    assert 0 < kv["peak_in_use_mib"] <= kv["pool_mib"]
    assert "a dense cache of every row's max_seq_len" in capsys.readouterr().out


def test_decode_step_modes_are_timed_side_by_side(tiny_model_dir, tmp_path):
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "3",
        "--adapters",
        "2",
        "--max-new-tokens",
        "3",
        "--decode-step",
        "static",
        "--eager-too",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0",
    )
    names = [r["name"] for r in report["results"]]
    assert names[2:] == [f"{n} (eager step)" for n in names[:2]]
    assert report["decode_step"] == "static"
    assert report["decode_graphs"]["static_steps"] > 0 and report["decode_graphs"]["replays"] == 0


def test_bad_kv_sizes_are_refused(tiny_model_dir, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--base-model", str(tiny_model_dir), "--kv-cache-mib", "0"])
    assert run_bench(args) == 2
    assert "--kv-cache-mib at least 1" in capsys.readouterr().out


def test_more_adapters_than_device_slots(tiny_model_dir, tmp_path):
    """A store far larger than the device slots: requests wait for slots, adapters are evicted, all finish."""
    report = _run(
        tmp_path,
        tiny_model_dir,
        "--requests",
        "6",
        "--adapters",
        "12",
        "--adapter-slots",
        "2",
        "--max-new-tokens",
        "3",
        "--repeats",
        "1",
        "--baseline-seconds",
        "0",
    )
    assert [r["tokens"] for r in report["results"]] == [18, 18]
    assert report["results"][1]["name"] == "engine, 6 requests over 12 lora adapters"


@pytest.mark.parametrize("chat", [True, False], ids=["chat-prompts", "plain-prompts"])
def test_served_bench_measures_through_a_real_server(tiny_model_dir, tmp_path, capsys, chat):
    """`--served`: a real `adapterserve serve` child process, adapters uploaded through the SDK, every
    request answered in full with exactly the in-process prompt, through gRPC and through the OpenAI HTTP
    API (chat completions, or completions for a base without a chat template), the in-process engine
    timed in the same rounds, the transformers baseline after, and the server stopped cleanly by SIGTERM."""
    model = tiny_model_dir if chat else _without_chat_template(tiny_model_dir, tmp_path)
    report = _run(
        tmp_path,
        model,
        "--served",
        "--requests",
        "4",
        "--adapters",
        "2",
        "--max-new-tokens",
        "3",
        "--repeats",
        "2",
        "--baseline-seconds",
        "10" if chat else "0",
        "--naive-requests",
        "1",
    )
    rows = {r["name"]: r for r in report["results"]}
    served_base, served_lora = rows["served, base only"], rows["served, 4 requests over 2 lora adapters"]
    in_process = rows["in-process engine, base only (no server)"]
    served_http = rows["served over the OpenAI HTTP API, base only"]  # the dev extra has httpx and fastapi
    for row in (served_base, served_lora, served_http, in_process):
        assert row["runs"] == 2 and row["tokens"] == 4 * 3 and row["tokens_per_s"] > 0
    assert served_base["vs_base_only"] == 1.0 and in_process["decode_step_ms"] is not None
    assert report["served"]["sigterm_exit_code"] == 0
    assert (
        "--served" not in report["served"]["command"] and "serve --base-model" in report["served"]["command"]
    )
    assert "--http-port" in report["served"]["command"] and "--no-http" not in report["served"]["command"]
    if chat:
        assert any("transformers generate" in n for n in rows)
    assert "served, base only" in capsys.readouterr().out


def test_served_command_serves_http_only_when_asked(tmp_path):
    """Without httpx or the [http] extra the bench asks for a gRPC-only server (no HTTP row), and with
    them the server's OpenAI API listens on the given port."""
    from adapterserve.bench.served import serve_command
    from adapterserve.bench.throughput import BenchSettings

    settings = BenchSettings(workdir=tmp_path)
    grpc_only = serve_command(settings, "model", tmp_path / "s", 5000, 128, "float32")
    with_http = serve_command(settings, "model", tmp_path / "s", 5000, 128, "float32", http_port=5001)
    assert "--no-http" in grpc_only and "--http-port" not in grpc_only
    assert "--no-http" not in with_http and with_http[with_http.index("--http-port") + 1] == "5001"
