"""The server under real load clients: NVIDIA AIPerf and a light client, on the base, N LoRAs and a kind mix.

    python -m adapterserve.bench.aiperf --aiperf /path/to/venv/bin/aiperf [--scenarios base,lora,mixed]
        [--workload random|shared-prefix] [--variant NAME=FLAGS ...] [--rounds N]
        [--placement shared|own-session|quota] [--server-arg=--cpu-prefill-threads=0 ...] [--out DIR]

AIPerf (`pip install aiperf==0.13.0`, in a virtual environment of its own: its pins clash with the
server's) is NVIDIA's load client for OpenAI-compatible servers. For each scenario this starts
`adapterserve serve` on the embedded model (HTTP API, nothing else set: no OMP_* variables), uploads the
scenario's adapters (random weights, bench/throughput.py), runs

    aiperf profile --endpoint-type completions --streaming, 128-token synthetic prompts, 32 output tokens
    (ignore_eos), concurrency 16, 128 requests after 16 warm-up, seed 7, round-robin over the adapters

(`--workload shared-prefix`: 4 shared 512-token prefixes plus 64 tokens per prompt, 16 output tokens,
concurrency 8, 96 requests after 8 warm-up: AIPerf's --num-prefix-prompts/--prefix-prompt-length, the
traffic of system prompts and RAG documents; `--workload multi-turn`: chat conversations whose every turn
resends the history, on the chat endpoint), and then, unless --no-light-client, the same 128 streamed requests from a light client (the `openai`
package, 16 threads), and writes one table (docs/performance.md shows one); each row says how many CPU
seconds the server and the client used over the run, the server's page faults and how much the
hypervisor stole (bench/cpu_usage.py). With --rounds N the scenarios run N times, interleaved (base, lora,
mixed, base, ...: slow drifts of a shared machine hit every scenario alike), and a summary follows the table: per workload and client the median over the
rounds and each workload's throughput against the base of the same round ("x base" figures are
same-run ratios, because one run of a scenario on a 2-core VM moves by 10-25%). Placement: `shared` runs
the server in the client's Unix session; `own-session` in a session of its own (setsid) (the kernel's autogroup
scheduler then splits the CPUs between the sessions, as a container CPU limit below the host's core
count would); `quota` in a cgroup (v1 or v2, needs root) with a CPU quota of --quota CPUs.
`--variant NAME=FLAGS` (repeatable) compares server configurations in one run: every scenario of every
round runs once per variant, interleaved, and a second summary gives each variant against the first in
the same round (throughput, TTFT p50 and max). `--variant-python NAME=PATH` runs a variant's server under
another interpreter (another checkout's virtual environment): code before and after a change, one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adapterserve.bench.aiperf_report import (
    HEADER,
    Row,
    format_row,
    summary,
    variant_summary,
)
from adapterserve.bench.aiperf_settings import AiperfSettings, parse_settings
from adapterserve.bench.cpu_usage import sample, usage
from adapterserve.bench.served import free_port

_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
_CGROUP_V2 = Path("/sys/fs/cgroup")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def _own_cgroup(v1: bool) -> str:
    """This process's cgroup (of the cpu controller on v1), relative to the hierarchy's root."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v1 and "cpu" in controllers.split(",")) or (not v1 and controllers == ""):
            return path.lstrip("/")
    return ""


def _quota_cgroup(cpus: float) -> Path:
    """A cgroup with a CPU quota of `cpus`, made inside this process's own cgroup (so it keeps whatever
    share that one has of the machine, as a container's limit sits inside its pod's group); returns the
    file a pid is written to."""
    name = f"adapterserve-bench-{os.getpid()}"
    if (_CGROUP_V1 / "cpu.cfs_quota_us").exists():
        group = _CGROUP_V1 / _own_cgroup(v1=True) / name
        group.mkdir(exist_ok=True)
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
    else:
        group = _CGROUP_V2 / _own_cgroup(v1=False) / name
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
    return group / "cgroup.procs"


class Server:
    """`adapterserve serve` on the embedded model in a temporary store, placed as asked."""

    def __init__(self, settings: AiperfSettings, log_path: Path):
        self.settings = settings
        self.port, self.http_port = free_port(), free_port()
        self.store = Path(tempfile.mkdtemp(prefix="adapterserve-aiperf-"))
        cmd = [
            settings.server_python or sys.executable,
            "-m",
            "adapterserve",
            "serve",
            "--store",
            str(self.store),
            "--port",
        ]
        cmd += [str(self.port), "--metrics-port", "0", "--http-port", str(self.http_port), "--insecure-admin"]
        cmd += ["--max-batch-size", str(max(32, settings.concurrency)), *settings.server_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "ADAPTERSERVE_", "GOMP_"))}
        env.update(settings.server_env)
        procs_file = _quota_cgroup(settings.quota) if settings.placement == "quota" else None
        self.cgroup = procs_file.parent if procs_file else None

        def place() -> None:  # in the child, before exec
            if procs_file is not None:
                procs_file.write_text(str(os.getpid()))

        self.log_path = log_path
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=settings.placement == "own-session",
                preexec_fn=place if procs_file else None,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 600) -> str:
        """The base's served name once the HTTP API answers /v1/models."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()[-2000:]}")
            try:
                reply = httpx.get(self.url + "/v1/models", timeout=5)
                if reply.status_code == 200:
                    return reply.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("the server did not become ready")

    def governor_changes(self) -> str:
        """The governor's thread changes and the decode pacing's switches so far, in order, as
        "2->1, paced, 1->2, unpaced"."""
        governor, pacing = "CPU contention governor: ", "decode pacing "
        changes = []
        for line in self.log_path.read_text().splitlines():
            if governor in line and (change := line.split(governor, 1)[1])[:1].isdigit():
                changes.append(change.split(" engine")[0].replace(" -> ", "->"))
            elif pacing in line:
                changes.append("paced" if line.split(pacing, 1)[1].startswith("on") else "unpaced")
        return ", ".join(changes)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.store, ignore_errors=True)
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError:
                pass


def _adapters(scenario: str, settings: AiperfSettings, model_dir: str, server: Server) -> list[str]:
    """Upload the scenario's adapters; their names (empty for the base)."""
    if scenario == "base":
        return []
    from adapterserve import Client
    from adapterserve.bench.throughput import BenchSettings, make_adapters

    bench = BenchSettings(adapters=settings.adapters, kinds="lora" if scenario == "lora" else "mixed")
    dirs = make_adapters(model_dir, bench, embed_std=0.02)
    with Client(f"127.0.0.1:{server.port}") as client:
        for name, path in dirs.items():
            client.upload_adapter(path, name, overwrite=True)
    return list(dirs)


def run_aiperf(settings: AiperfSettings, models: list[str], tokenizer: str, url: str, out: Path) -> dict:
    cmd = [settings.aiperf, "profile", "-m", ",".join(models), "--url", url.removeprefix("http://")]
    endpoint = "chat" if settings.conversations else "completions"
    cmd += ["--endpoint-type", endpoint, "--streaming", "--tokenizer", tokenizer]
    cmd += ["--prompt-input-tokens-mean", str(settings.input_tokens), "--prompt-input-tokens-stddev", "0"]
    cmd += ["--prompt-output-tokens-mean", str(settings.output_tokens), "--prompt-output-tokens-stddev", "0"]
    cmd += ["--extra-inputs", "ignore_eos:true", "--concurrency", str(settings.concurrency)]
    cmd += ["--request-count", str(settings.requests), "--warmup-request-count", str(settings.warmup)]
    if settings.conversations:
        cmd += ["--conversation-num", str(settings.conversations)]
        cmd += ["--conversation-turn-mean", str(settings.turns), "--conversation-turn-stddev", "0"]
    if settings.prefix_prompts:
        cmd += ["--num-prefix-prompts", str(settings.prefix_prompts)]
        cmd += ["--prefix-prompt-length", str(settings.prefix_length)]
    cmd += [
        "--random-seed",
        "7",
        "--ui-type",
        "none",
        "--no-gpu-telemetry",
        "--output-artifact-dir",
        str(out),
    ]
    if len(models) > 1:
        cmd += ["--model-selection-strategy", "round_robin"]
    log_path = out.parent / f"{out.name}.log"
    with log_path.open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    export = out / "profile_export_aiperf.json"
    if done.returncode != 0:
        if not export.is_file():
            raise RuntimeError(f"aiperf exited {done.returncode} without results; see {log_path}")
        # e.g. an optional producer of AIPerf's own (server metrics) missed heartbeats on a starved
        # machine: the request records are whole, AIPerf still exits 1
        print(
            f"aiperf exited {done.returncode} but wrote its export (see {log_path}); using it",
            file=sys.stderr,
        )
    report = json.loads(export.read_text())
    report["_exit_code"] = done.returncode
    return report


def aiperf_row(scenario: str, report: dict) -> Row:
    errors = sum(int(e.get("count", 0)) for e in report.get("error_summary") or [])
    itl = report.get("inter_token_latency") or {}
    return Row(
        scenario=scenario,
        client="AIPerf",
        tokens_per_s=report["output_token_throughput"]["avg"],
        ttft_p50_ms=report["time_to_first_token"]["p50"],
        ttft_max_ms=report["time_to_first_token"].get("max"),
        itl_p50_ms=itl.get("p50"),
        itl_p99_ms=itl.get("p99"),
        errors=errors,
        note="" if not report.get("_exit_code") else f"aiperf exit {report['_exit_code']}",
    )


def light_client(settings: AiperfSettings, models: list[str], tokenizer: str, url: str) -> Row:
    """The same number of streamed completions from the `openai` package on `concurrency` threads:
    prompts of `input_tokens` tokens (random words, re-tokenized to the exact length)."""
    import random

    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(7)
    vocab = [t for t in range(1000, 20000)]
    prompts = [tok.decode([rng.choice(vocab) for _ in range(settings.input_tokens)]) for _ in range(64)]
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float, bool]:
        start = time.perf_counter()
        first = None
        tokens = 0
        try:
            stream = client.completions.create(
                model=models[i % len(models)],
                prompt=prompts[i % len(prompts)],
                max_tokens=settings.output_tokens,
                stream=True,
                extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return tokens, first or 0.0, True
        except Exception:  # counted as an error in the row
            return 0, 0.0, False

    with ThreadPoolExecutor(settings.concurrency) as pool:
        list(pool.map(one, range(settings.warmup)))
        start = time.perf_counter()
        results = list(pool.map(one, range(settings.requests)))
        seconds = time.perf_counter() - start
    return Row(
        scenario="",
        client="light (openai pkg)",
        tokens_per_s=sum(r[0] for r in results) / seconds,
        ttft_p50_ms=statistics.median(r[1] for r in results if r[2]) * 1e3,
        itl_p50_ms=None,
        itl_p99_ms=None,
        errors=sum(not r[2] for r in results),
    )


def run(settings: AiperfSettings) -> list[Row]:
    from adapterserve.server.model.default_model import default_model_dir

    model_dir = str(default_model_dir())
    settings.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    variants = settings.variants or [("", [])]
    for round_ in range(1, settings.rounds + 1):
        for scenario in settings.scenarios:
            for name, flags in variants:
                variant = dataclasses.replace(
                    settings,
                    server_args=[*settings.server_args, *flags],
                    server_python=settings.variant_pythons.get(name, settings.server_python),
                )
                for row in run_scenario(variant, scenario, round_, model_dir, name):
                    row.variant = name
                    rows.append(row)
    return rows


def run_scenario(
    settings: AiperfSettings, scenario: str, round_: int, model_dir: str, variant: str = ""
) -> list[Row]:
    """One scenario on a fresh server: AIPerf, then the light client (as the settings ask)."""
    stem = f"{variant or settings.label or settings.placement}-{scenario}"
    if settings.rounds > 1:
        stem += f"-r{round_}"
    rows: list[Row] = []
    server = Server(settings, settings.out / f"{stem}-server.log")
    try:
        base_name = server.wait_ready()
        models = _adapters(scenario, settings, model_dir, server) or [base_name]
        if settings.run_aiperf:
            before = sample(server.proc.pid)
            report = run_aiperf(settings, models, model_dir, server.url, settings.out / stem)
            row = aiperf_row(scenario, report)
            row.cpu = usage(before, sample(server.proc.pid), client="children")
            row.governor = server.governor_changes()
            rows.append(row)
        if settings.light_client:
            before = sample(server.proc.pid)
            row = light_client(settings, models, model_dir, server.url)
            row.cpu = usage(before, sample(server.proc.pid), client="own")
            row.scenario = scenario
            rows.append(row)
    finally:
        server.stop()
    for row in rows:
        row.round, row.variant = round_, variant
        print(format_row(row, settings), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}\n{HEADER}", flush=True)
    rows = run(settings)
    table = "\n".join([HEADER, *(format_row(r, settings) for r in rows)])
    if settings.rounds > 1 or len(settings.scenarios) > 1 or settings.variants:
        medians = summary(rows)
        table += "\n\n" + medians
        print("\n" + medians, flush=True)
    if len(settings.variants) > 1:
        compared = variant_summary(rows)
        table += "\n\n" + compared
        print("\n" + compared, flush=True)
    (settings.out / f"{settings.label or settings.placement}.md").write_text(f"{machine()}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
