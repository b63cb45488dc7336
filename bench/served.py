"""Throughput through the server (`adapterserve bench --served`): what a user of the API gets.

`adapterserve serve` runs in a child process on 127.0.0.1 with the bench's engine settings; the adapters
are uploaded through the SDK's admin API; each wave sends every request at once as a chat (`messages`,
the same chat-templated prompts as the in-process bench) from one asyncio SDK client in this process, and
its throughput is the generated tokens over the wave's wall time (the client's own CPU counts, as it
would for any server measured from the same machine).

Rounds interleave, as in throughput.py: served base only, served over A adapters, the served base
through the OpenAI-compatible HTTP API (the same chats to /v1/chat/completions from one httpx client;
only where httpx and the server's [http] extra are installed), and the in-process engine's base only (the
same engine without a server, in this process while the server idles), so the report gives each front
end's cost measured in the same rounds. The in-process baselines (transformers' batched `generate`) run
after the server has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adapterserve.bench.hardware import peak_bandwidth, weight_bytes_per_step
from adapterserve.bench.throughput import (
    QUESTIONS,
    BenchSettings,
    EngineRun,
    baseline_row,
    device_name,
    engine_rows,
    make_adapters,
    make_prompts,
    plain_prompt,
    progress,
    run_baselines,
    run_engine_workload,
)
from adapterserve.server.cpu.omp_pools import release_openmp_pool, run_releasing_pool
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model, resolve_source
from adapterserve.server.settings import EngineSettings

SERVED_BASE = "served, base only"
SERVED_HTTP_BASE = "served over the OpenAI HTTP API, base only"
IN_PROCESS_BASE = "in-process engine, base only (no server)"


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    log_path: Path
    http_url: str | None = None  # the OpenAI-compatible API's base URL, when the server has one

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_available() -> bool:
    """The served bench can time the HTTP API: httpx (the client) and the server's [http] extra are here."""
    return all(importlib.util.find_spec(m) is not None for m in ("httpx", "fastapi", "uvicorn"))


def serve_command(
    settings: BenchSettings,
    model_dir: str,
    store: Path,
    port: int,
    max_seq_len: int,
    dtype: str,
    http_port: int | None = None,
) -> list[str]:
    """The `adapterserve serve` command line of the engine settings the in-process bench uses (`dtype`:
    the in-process base's resolved dtype, since serve's `auto` and bench's `auto` differ on CUDA); the
    OpenAI-compatible HTTP API on `http_port`, or none."""
    cmd = [
        sys.executable,
        "-m",
        "adapterserve",
        "serve",
        "--base-model",
        model_dir,
        "--quantize",
        settings.quantize,
        "--dtype",
        dtype,
        "--store",
        str(store),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *(["--http-port", str(http_port)] if http_port is not None else ["--no-http"]),
        "--insecure-admin",
        "--max-batch-size",
        str(settings.requests),
        "--max-queue",
        str(max(settings.requests, 1)),
        "--max-seq-len",
        str(max_seq_len),
        "--max-new-tokens",
        str(settings.max_new_tokens),
        "--max-prompt-tokens",
        str(max_seq_len - settings.max_new_tokens),
        "--max-prefill-tokens",
        "8192",
        "--adapter-slots",
        str(settings.adapter_slots or settings.adapters),
        "--decode-step",
        settings.decode_step,
        "--lora-backend",
        settings.lora_backend,
        "--log-level",
        "WARNING",
    ]
    if settings.device:
        cmd += ["--device", settings.device]
    return cmd


def start_server(
    cmd: list[str], port: int, log_path: Path, env: dict[str, str], http_port: int | None = None
) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    http_url = None if http_port is None else f"http://127.0.0.1:{http_port}"
    return ServerProcess(proc=proc, target=f"127.0.0.1:{port}", log_path=log_path, http_url=http_url)


def stop_server(server: ServerProcess) -> int | None:
    """SIGTERM, then SIGKILL after 30 s. Returns the exit code (None: had to be killed)."""
    if server.proc.poll() is not None:
        return server.proc.returncode
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        return None


def request_inputs(tokenizer, n: int) -> list[dict]:
    """The SDK inputs of make_prompts' n prompts: the same chats (the server applies the same chat
    template), or, for a base without one, the same plain text."""
    if getattr(tokenizer, "chat_template", None):
        return [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]} for i in range(n)]
    return [{"prompt": plain_prompt(i)} for i in range(n)]


async def _wave(
    client, inputs: list[dict], adapters: list[str | None], new_tokens: int, prompt_tokens: list[int]
) -> EngineRun:
    """Every request at once; tokens over the wall time until the last one finishes. Each request must
    have seen exactly its in-process prompt (`prompt_tokens`), so both paths do the same work."""

    async def one(given: dict, adapter: str | None):
        return await client.generate(
            **given, adapter=adapter, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )

    start = time.perf_counter()
    results = await asyncio.gather(*(one(m, a) for m, a in zip(inputs, adapters, strict=True)))
    run = EngineRun(tokens=sum(r.generated_tokens for r in results), seconds=time.perf_counter() - start)
    run.ttft_s = [r.timings.time_to_first_token_s for r in results]
    _check_prompt_tokens([r.prompt_tokens for r in results], prompt_tokens)
    return run


def _check_prompt_tokens(seen: list[int], prompt_tokens: list[int]) -> None:
    if seen != prompt_tokens:
        raise RuntimeError(f"the server saw prompts of {seen} tokens, the in-process engine {prompt_tokens}")


async def _http_wave(
    http, url: str, model: str, inputs: list[dict], new_tokens: int, prompt_tokens: list[int]
) -> EngineRun:
    """_wave through the OpenAI-compatible API: chats to /v1/chat/completions (plain prompts to
    /v1/completions), greedy, `ignore_eos`, all at once from one httpx client."""

    async def one(given: dict) -> dict:
        chat = "messages" in given
        body = {
            "model": model,
            **given,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = await http.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code} from the server: {reply.text[:500]}")
        return reply.json()["usage"]

    start = time.perf_counter()
    usages = await asyncio.gather(*(one(m) for m in inputs))
    run = EngineRun(tokens=sum(u["completion_tokens"] for u in usages), seconds=time.perf_counter() - start)
    _check_prompt_tokens([u["prompt_tokens"] for u in usages], prompt_tokens)
    return run


async def _served_model_name(http, url: str) -> str:
    """The base model's name on the OpenAI API (the /v1/models entry that is not an adapter)."""
    reply = await http.get(f"{url}/v1/models")
    reply.raise_for_status()
    return next(m["id"] for m in reply.json()["data"] if m.get("parent") is None)


def run_served(settings: BenchSettings) -> dict:
    """Serve, upload, then interleaved rounds of served base / served adapters / in-process base."""
    from adapterserve import AsyncClient

    model_dir, label = resolve_source(settings.base_model)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    base = load_base_model(
        model_dir, quantize=settings.quantize, dtype=settings.dtype, device=settings.device
    )
    embed_std = float(base.model.get_input_embeddings().weight.float().std())
    progress(f"preparing {settings.adapters} {settings.kinds} adapters in {settings.workdir}")
    adapter_dirs = make_adapters(model_dir, settings, embed_std)
    names = list(adapter_dirs)
    prompts = make_prompts(base.tokenizer, settings.requests)
    inputs = request_inputs(base.tokenizer, settings.requests)
    max_seq_len = settings.max_seq_len or max(len(p) for p in prompts) + settings.max_new_tokens + 16
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=settings.requests,
            max_seq_len=max_seq_len,
            max_prefill_tokens=8192,
            max_queue=settings.requests,
            adapter_slots=1,
            decode_step=settings.decode_step,
            compile_decode=settings.compile_decode,
            lora_backend=settings.lora_backend,
        ),
    )
    store = settings.workdir / "served-store"
    shutil.rmtree(store, ignore_errors=True)
    port = free_port()
    http_port = free_port() if http_available() else None
    dtype = str(base.dtype).removeprefix("torch.")
    cmd = serve_command(settings, model_dir, store, port, max_seq_len, dtype, http_port)
    if settings.compile_decode:
        progress("--compile-decode is not a serve flag: the served engine runs uncompiled")
    if http_port is None:
        progress(
            "no HTTP row: it needs httpx and the server's [http] extra (pip install 'adapterserve[http]' httpx)"
        )
    server = start_server(cmd, port, settings.workdir / "served.log", dict(os.environ), http_port)
    progress(f"server: {' '.join(cmd[2:])}")
    workloads: dict[str, list[str | None]] = {
        SERVED_BASE: [None] * settings.requests,
        f"served, {settings.requests} requests over {settings.adapters} {settings.kinds} adapters": [
            names[i % len(names)] for i in range(settings.requests)
        ],
        **({SERVED_HTTP_BASE: [None] * settings.requests} if http_port is not None else {}),
        IN_PROCESS_BASE: [None] * settings.requests,
    }
    runs: dict[str, list[EngineRun]] = {name: [] for name in workloads}
    release_openmp_pool()  # this thread loaded the model; the in-process engine runs on another one
    try:
        asyncio.run(
            _served_rounds(
                AsyncClient, server, adapter_dirs, engine, prompts, inputs, workloads, runs, settings
            )
        )
    except BaseException:
        progress(f"server log tail:\n{server.log_tail()}")
        raise
    finally:
        rc = stop_server(server)
    ctx = {
        "weight_bytes": weight_bytes_per_step(base.model),
        "peak": peak_bandwidth(base.device, settings.peak_bandwidth_gbs),
    }
    rows = engine_rows(runs, SERVED_BASE, settings.requests, ctx)
    del engine
    base_tps = rows[0]["tokens_per_s"]
    if settings.baseline_seconds > 0:
        rows.extend(
            baseline_row(b, base_tps) for b in run_baselines(settings, model_dir, adapter_dirs, prompts)
        )
    return {
        "base_model": label,
        "quantize": settings.quantize,
        "dtype": dtype,
        "device": device_name(base.device),
        "settings": {k: str(v) for k, v in vars(settings).items()},
        "served": {"command": " ".join(cmd[2:]), "sigterm_exit_code": rc},
        "weight_bytes_per_step_mib": round(ctx["weight_bytes"] / 2**20, 1),
        "peak_bandwidth": ctx["peak"].source if ctx["peak"] is not None else None,
        "decode_step": settings.decode_step,
        "results": rows,
    }


async def _served_rounds(
    client_cls, server, adapter_dirs, engine, prompts, inputs, workloads, runs, settings: BenchSettings
) -> None:
    async with client_cls(server.target, timeout=600) as client:
        deadline = time.monotonic() + 600
        while True:  # the server loads the model first; fail early if it died
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.proc.returncode}")
            try:
                await client.wait_until_serving(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        progress(f"uploading {len(adapter_dirs)} adapters through the admin API")
        for name, path in adapter_dirs.items():
            await client.upload_adapter(path, name)
        async with contextlib.AsyncExitStack() as stack:
            http = None
            if server.http_url is not None:
                import httpx

                limits = httpx.Limits(
                    max_connections=settings.requests, max_keepalive_connections=settings.requests
                )
                http = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=limits))
                model = await _served_model_name(http, server.http_url)
            prompt_tokens = [len(p) for p in prompts]

            async def timed(name: str) -> EngineRun:
                if name == IN_PROCESS_BASE:
                    # on a worker thread, as in the server (its OpenMP pool released after, cpu/omp_pools.py)
                    return await run_releasing_pool(
                        run_engine_workload, engine, prompts, workloads[name], settings.max_new_tokens
                    )
                if name == SERVED_HTTP_BASE:
                    return await _http_wave(
                        http, server.http_url, model, inputs, settings.max_new_tokens, prompt_tokens
                    )
                return await _wave(client, inputs, workloads[name], settings.max_new_tokens, prompt_tokens)

            await _timed_rounds(timed, workloads, runs, settings)


async def _timed_rounds(timed, workloads, runs, settings: BenchSettings) -> None:
    """Every workload warmed once at full size, then `repeats` rounds, the order flipped each round."""
    for name in workloads:
        progress(f"warm-up at full size: {name}")
        run = await timed(name)
        if name != IN_PROCESS_BASE and run.tokens != settings.requests * settings.max_new_tokens:
            raise RuntimeError(
                f"{name}: {run.tokens} tokens, expected {settings.requests * settings.max_new_tokens}"
            )
    order = list(workloads)
    for round_ in range(settings.repeats):
        for name in order if round_ % 2 == 0 else reversed(order):
            progress(f"round {round_ + 1}/{settings.repeats}: {name}")
            runs[name].append(await timed(name))
