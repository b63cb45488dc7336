"""Throughput of the engine with many adapters vs its baselines, measured in one process.

Method (the machines are shared and noisy, and a cold first run says nothing about steady state):
  1. every engine workload is run once at full size, untimed (warm-up: allocator, kernels, caches);
  2. then the workloads — engine base-only and engine over A adapters — run interleaved, `repeats` times
     each (ABAB..., the order flipped every round so drift does not favour one), and each is reported as
     the median with its spread (min..max); the ratio to the base is the median of the per-round ratios;
  3. every step is timed: decode-step time (steps with no prefill in them) and time to first token;
     on CUDA the peak device memory and the fraction of the memory-bandwidth limit (bench/hardware.py);
  4. the baselines (bench/baselines.py) run after, each capped by wall time.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adapterserve.bench import baselines
from adapterserve.bench.hardware import (
    bandwidth_use,
    kv_bytes_per_token,
    peak_bandwidth,
    weight_bytes_per_step,
)
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.types import TokenEvent
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Translate 'good morning' to Spanish.",
    "What is the boiling point of water?",
    "Who wrote Hamlet?",
]
MIXED_KINDS = ("lora", "dora", "ia3", "prompt", "prefix")


@dataclass
class BenchSettings:
    base_model: str | None = None  # None = embedded default (SmolLM2-135M-Instruct)
    quantize: str = "none"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None = cuda if available, else cpu
    requests: int = 64
    adapters: int = 32
    kinds: str = "lora"  # "lora" or "mixed" (LoRA, DoRA, IA3, prompt, prefix in turn)
    max_new_tokens: int = 32
    repeats: int = 3  # timed runs of each engine workload, interleaved
    naive_requests: int = 4
    baseline_seconds: float = 60.0  # wall-time cap of each baseline (0 = skip the baselines)
    peak_bandwidth_gbs: float | None = None  # default: looked up from the card's name (CUDA only)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    lora_backend: str = "torch"  # EngineSettings.lora_backend: torch or triton (CUDA)
    workdir: Path = Path("/tmp/adapterserve-bench")
    decode_step: str = "auto"  # EngineSettings.decode_step
    compile_decode: bool = False
    eager_too: bool = False  # also time both workloads with the eager decode step, in the same rounds
    adapter_slots: int | None = None  # device slots (default: one per adapter)
    max_seq_len: int | None = None  # engine row length (default: longest prompt + new tokens + 16)
    kv_cache_bytes: int | None = None  # paged KV pool size (default: every row's max_seq_len)


@dataclass
class EngineRun:
    tokens: int
    seconds: float
    decode_step_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    kv_bytes_per_decode_step: list[float] = field(default_factory=list)
    peak_device_bytes: int | None = None
    kv_peak_in_use_bytes: int = 0  # KV blocks held at the fullest step (paged: reserved; dense: all)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache during the run
    prefix_cache_hits: int = 0  # of those, found computed (not prefilled again)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _peft_config(kind: str, settings: BenchSettings):
    """The PEFT config of one bench adapter of `kind` (lora, dora, ia3, prompt or prefix), from the kind's
    module."""
    from adapterserve.server.adapters.kind import all_kinds

    low_rank = {
        "r": settings.rank,
        "lora_alpha": 2 * settings.rank,
        "target_modules": list(settings.lora_targets),
        "init_lora_weights": False,
    }
    fields: dict = {
        "lora": low_rank,
        "dora": low_rank,
        "ia3": {"init_ia3_weights": False},
    }.get(kind, {"num_virtual_tokens": 8})
    return {k.name: k for k in all_kinds()}[kind].peft_config(**fields)


def make_adapters(model_dir: str, settings: BenchSettings, embed_std: float) -> dict[str, Path]:
    """A adapters with small random weights, in PEFT format. Built on a weightless copy of the base
    (the same helper as `serve --demo-adapters`), and reused between runs with the same base and
    adapter settings (the folder name carries a digest of them)."""
    from transformers import AutoConfig

    from adapterserve.server.api.demo import write_demo_adapter

    kinds = ["lora"] if settings.kinds == "lora" else list(MIXED_KINDS)
    config = AutoConfig.from_pretrained(model_dir)
    key = f"{Path(model_dir).resolve()}|{','.join(settings.lora_targets)}|r{settings.rank}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:10]
    out: dict[str, Path] = {}
    first: dict[str, Path] = {}  # kind -> its first adapter, made by PEFT
    for i in range(settings.adapters):
        kind = kinds[i % len(kinds)]
        path = settings.workdir / f"{tag}-{kind}-{i}"
        out[f"{kind}-{i}"] = path
        if not (path / "adapter_model.safetensors").is_file():
            if kind == "lora" and kind in first:
                _resample_lora(first[kind], path, seed=i)
            else:
                write_demo_adapter(config, _peft_config(kind, settings), path, seed=i, embed_std=embed_std)
        first.setdefault(kind, path)
    return out


def _resample_lora(template: Path, path: Path, seed: int) -> None:
    """Another LoRA adapter in the template's exact PEFT format (its config, tensor names and shapes),
    with new random weights of the same scale: thousands of adapters in seconds, where building each
    through PEFT takes ~0.2 s."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(template / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    fresh = {
        name: (torch.randn(t.shape, generator=generator) * t.float().std()).to(t.dtype).contiguous()
        for name, t in tensors.items()
    }
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(template / "adapter_config.json", tmp / "adapter_config.json")
    save_file(fresh, str(tmp / "adapter_model.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def plain_prompt(i: int) -> str:
    """The i-th question as plain text, for a base without a chat template."""
    return f"Question: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:"


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat prompts; a tokenizer without a chat template (a non-instruct base) gets plain text."""
    if getattr(tokenizer, "chat_template", None):
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    add_generation_prompt=True,
                    return_dict=False,
                )
            )
            for i in range(n)
        ]
    return [list(tokenizer(plain_prompt(i))["input_ids"]) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine_workload(
    engine: OfflineEngine, prompts: list[list[int]], adapters: list[str | None], max_new: int
) -> EngineRun:
    """Submit every request at once, then step the engine until all finish, timing every step."""
    core = engine.core
    device = core.device
    per_token_kv = kv_bytes_per_token(
        engine.base.spec.num_layers,
        engine.base.spec.num_key_value_heads,
        engine.base.spec.head_dim,
        core.dtype,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    sinks: list[list[TokenEvent]] = [[] for _ in prompts]
    start = time.perf_counter()
    submitted = time.monotonic()
    seqs = [
        engine.submit(engine.request(p, adapter=a, max_new_tokens=max_new, ignore_eos=True), sink)
        for p, a, sink in zip(prompts, adapters, sinks, strict=True)
    ]
    run = EngineRun(tokens=0, seconds=0.0)
    # every run starts with no cached prefix: earlier runs of the same prompts must not speed it up (what
    # is shared within the run, say a chat template's system prompt, is reused and shows as the hit rate)
    core.cache.forget()
    queries, hits = core.prefix_cache_queries, core.prefix_cache_hits
    while core.has_work():
        run.kv_peak_in_use_bytes = max(run.kv_peak_in_use_bytes, core.cache.bytes_in_use())
        decode_only = not core.waiting and core.num_decoding == len(core.running) and core.num_decoding > 0
        kv_tokens = sum(s.length for s in core.running) if decode_only else 0
        t0 = time.perf_counter()
        core.step()
        _sync(device)
        if decode_only:
            run.decode_step_s.append(time.perf_counter() - t0)
            run.kv_bytes_per_decode_step.append(kv_tokens * per_token_kv)
    run.seconds = time.perf_counter() - start
    run.prefix_cache_queries = core.prefix_cache_queries - queries
    run.prefix_cache_hits = core.prefix_cache_hits - hits
    for seq, sink in zip(seqs, sinks, strict=True):
        errors = [ev.error for ev in sink if ev.error is not None]
        if errors:
            raise RuntimeError(f"bench request failed: {errors[0]}")
        run.tokens += sum(len(ev.token_ids) for ev in sink)
        if seq.first_token_at is not None:
            run.ttft_s.append(seq.first_token_at - submitted)
    if device.type == "cuda":
        run.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    return run


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _engine_row(name: str, requests: int, runs: list[EngineRun], ratios: list[float], ctx: dict) -> dict:
    tps = [r.tokens_per_s for r in runs]
    steps = [statistics.median(r.decode_step_s) for r in runs if r.decode_step_s]
    ttfts = [statistics.median(r.ttft_s) for r in runs if r.ttft_s]
    row = {
        "name": name,
        "kind": "engine",
        "requests": requests,
        "tokens": runs[0].tokens,
        "runs": len(runs),
        "seconds": statistics.median(r.seconds for r in runs),
        "tokens_per_s": round(statistics.median(tps), 1),
        "tokens_per_s_min": round(min(tps), 1),
        "tokens_per_s_max": round(max(tps), 1),
        "vs_base_only": round(statistics.median(ratios), 3),
        "vs_base_only_min": round(min(ratios), 3),
        "vs_base_only_max": round(max(ratios), 3),
        "decode_step_ms": round(1000 * statistics.median(steps), 2) if steps else None,
        "ttft_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
    }
    queries = sum(r.prefix_cache_queries for r in runs)
    if queries:  # prompt tokens found computed: the prefix cache's hit rate over the timed runs
        row["prefix_cache_hit_rate"] = round(sum(r.prefix_cache_hits for r in runs) / queries, 3)
    peaks = [r.peak_device_bytes for r in runs if r.peak_device_bytes is not None]
    if peaks:
        row["peak_device_mib"] = round(max(peaks) / 2**20, 1)
    kv = [statistics.mean(r.kv_bytes_per_decode_step) for r in runs if r.kv_bytes_per_decode_step]
    if steps and kv:
        use = bandwidth_use(ctx["weight_bytes"], statistics.median(kv), statistics.median(steps), ctx["peak"])
        row["bytes_per_decode_step_mib"] = round(use.bytes_per_step / 2**20, 1)
        row["achieved_gb_per_s"] = round(use.achieved_bytes_per_s / 1e9, 1)
        if use.fraction_of_peak is not None:
            row["fraction_of_bandwidth_limit"] = round(use.fraction_of_peak, 4)
    return row


def engine_rows(runs: dict[str, list[EngineRun]], base_name: str, requests: int, ctx: dict) -> list[dict]:
    """One report row per workload; ratios are per round against the `base_name` run of that round."""
    base_runs = runs[base_name]
    return [
        _engine_row(
            name,
            requests,
            r,
            [a.tokens_per_s / b.tokens_per_s for a, b in zip(r, base_runs, strict=True)],
            ctx,
        )
        for name, r in runs.items()
    ]


def baseline_row(result: baselines.BaselineResult, base_tps: float) -> dict:
    tps = result.tokens / result.seconds if result.seconds else 0.0
    return {
        "name": result.name,
        "kind": "baseline",
        "requests": result.requests,
        "tokens": result.tokens,
        "runs": 1,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(tps, 1),
        "vs_base_only": round(tps / base_tps, 3) if base_tps else None,
        "capped_by_time": result.capped,
        "note": result.note,
    }


def run(settings: BenchSettings) -> dict:
    from adapterserve.server.model.loading import resolve_source

    if settings.requests < 1 or settings.adapters < 1 or settings.max_new_tokens < 1 or settings.repeats < 1:
        raise ValueError("requests, adapters, max_new_tokens and repeats must each be at least 1")
    model_dir, label = resolve_source(settings.base_model)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    base = load_base_model(
        model_dir, quantize=settings.quantize, dtype=settings.dtype, device=settings.device
    )
    progress(f"preparing {settings.adapters} {settings.kinds} adapters in {settings.workdir}")
    embed_std = float(base.model.get_input_embeddings().weight.float().std())
    adapter_dirs = make_adapters(model_dir, settings, embed_std)
    names = list(adapter_dirs)
    prompts = make_prompts(base.tokenizer, settings.requests)
    ctx = {
        "weight_bytes": weight_bytes_per_step(base.model),
        "peak": peak_bandwidth(base.device, settings.peak_bandwidth_gbs),
    }
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=settings.requests,
            max_seq_len=settings.max_seq_len or max(len(p) for p in prompts) + settings.max_new_tokens + 16,
            kv_cache_bytes=settings.kv_cache_bytes,
            max_prefill_tokens=8192,
            max_queue=settings.requests,
            adapter_slots=settings.adapter_slots or settings.adapters,
            decode_step=settings.decode_step,
            compile_decode=settings.compile_decode,
            lora_backend=settings.lora_backend,
        ),
    )
    graphs = engine.core.decode_graphs
    for n, d in adapter_dirs.items():
        engine.add_adapter(n, d)
    mixed_name = f"engine, {settings.requests} requests over {settings.adapters} {settings.kinds} adapters"
    workloads: dict[str, list[str | None]] = {
        "engine, base only": [None] * settings.requests,
        mixed_name: [names[i % len(names)] for i in range(settings.requests)],
    }
    eager_names: set[str] = set()
    if settings.eager_too and graphs is not None:  # the same workloads through the eager reference step
        for name in list(workloads):
            workloads[f"{name} (eager step)"] = workloads[name]
            eager_names.add(f"{name} (eager step)")

    def timed(name: str, engine: OfflineEngine = engine) -> EngineRun:
        engine.core.decode_graphs = None if name in eager_names else graphs
        return run_engine_workload(engine, prompts, workloads[name], settings.max_new_tokens)

    for name in workloads:
        progress(f"warm-up at full size: {name}")
        timed(name)
    runs: dict[str, list[EngineRun]] = {name: [] for name in workloads}
    order = list(workloads)
    for round_ in range(settings.repeats):
        for name in order if round_ % 2 == 0 else reversed(order):
            progress(f"round {round_ + 1}/{settings.repeats}: {name}")
            runs[name].append(timed(name))
    rows = engine_rows(runs, "engine, base only", settings.requests, ctx)
    engine_stats = engine.core.stats()
    spec, core = engine.base.spec, engine.core
    dense_kv_bytes = (
        core.settings.max_batch_size
        * core.settings.max_seq_len
        * kv_bytes_per_token(spec.num_layers, spec.num_key_value_heads, spec.head_dim, core.dtype)
    )
    del engine
    base_tps = rows[0]["tokens_per_s"]
    if settings.baseline_seconds > 0:
        rows.extend(
            baseline_row(b, base_tps) for b in run_baselines(settings, model_dir, adapter_dirs, prompts)
        )
    peak = ctx["peak"]
    return {
        "base_model": label,
        "quantize": settings.quantize,
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": device_name(base.device),
        "settings": {k: str(v) for k, v in asdict(settings).items()},
        "torch_threads": torch.get_num_threads(),
        "weight_bytes_per_step_mib": round(ctx["weight_bytes"] / 2**20, 1),
        "kv_cache_mib": round(engine_stats.kv_cache_bytes / 2**20, 1),
        "kv_cache": engine_kv_report(engine_stats.kv_cache_bytes, runs, dense_kv_bytes),
        "peak_bandwidth": peak.source if peak is not None else None,
        "decode_step": _decode_step_label(settings, graphs),
        "decode_graphs": asdict(graphs.stats) if graphs is not None else None,
        "results": rows,
    }


def engine_kv_report(pool_bytes: int, runs: dict[str, list[EngineRun]], dense_bytes: int) -> dict:
    """The KV cache's memory: the pool, the most any timed run held, and what a dense cache of every
    row's max_seq_len would need."""
    peak = max((r.kv_peak_in_use_bytes for rs in runs.values() for r in rs), default=0)
    return {
        "pool_mib": round(pool_bytes / 2**20, 1),
        "peak_in_use_mib": round(peak / 2**20, 1),
        "dense_equivalent_mib": round(dense_bytes / 2**20, 1),
    }


def _decode_step_label(settings: BenchSettings, graphs) -> str:
    if graphs is None:
        return "eager"
    failed = graphs.stats.disabled is not None  # the engine fell back to the uncompiled static step
    if not graphs.capture:
        if settings.compile_decode:
            return "static (compilation failed, ran uncompiled)" if failed else "static, compiled"
        return "static"
    return "static, uncaptured (graph capture failed)" if failed else "CUDA graphs"


def run_baselines(settings: BenchSettings, model_dir: str, adapter_dirs: dict[str, Path], prompts) -> list:
    cfg = baselines.BaselineSettings(
        model_dir=model_dir,
        quantize=settings.quantize,
        dtype=settings.dtype,
        device=settings.device,
        max_new_tokens=settings.max_new_tokens,
        seconds=settings.baseline_seconds,
    )
    loras = [n for n in adapter_dirs if n.startswith("lora")]
    out = []
    progress(f"baseline: transformers batched generate (cap {cfg.seconds:g} s)")
    out.append(baselines.transformers_batched(prompts, cfg))
    if settings.kinds == "lora":
        progress(f"baseline: PEFT static mixed-LoRA batch (cap {cfg.seconds:g} s)")
        out.append(baselines.peft_static_batch(prompts, adapter_dirs, loras, cfg))
    progress(f"baseline: naive PEFT, one request at a time (cap {cfg.seconds:g} s)")
    out.append(baselines.naive_peft(prompts, adapter_dirs, loras, cfg, settings.naive_requests))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    weights = report.get("weight_bytes_per_step_mib")
    print(
        f"base {report['base_model']} quantize={report['quantize']} dtype={report['dtype']} "
        f"device={report['device']}" + ("" if weights is None else f" weights/step={weights} MiB")
    )
    if report.get("served"):
        print(f"served: {report['served']['command']}")
    if report["peak_bandwidth"]:
        print(f"peak bandwidth: {report['peak_bandwidth']}")
    kv = report.get("kv_cache")
    if kv:
        print(
            f"KV cache: pool {kv['pool_mib']} MiB, at most {kv['peak_in_use_mib']} MiB held; a dense cache "
            f"of every row's max_seq_len: {kv['dense_equivalent_mib']} MiB"
        )
    graphs = report.get("decode_graphs")
    print(f"decode step: {report.get('decode_step', 'eager')}", end="")
    if graphs:
        print(
            f" ({graphs['captures']} graphs captured in {graphs['capture_seconds']:.1f}s, "
            f"{graphs['replays']} replays, {graphs['static_steps']} uncaptured static steps"
            + (f"; capture failed: {graphs['disabled']}" if graphs["disabled"] else "")
            + ")",
            end="",
        )
    print()
    print(
        f"{'run':<58} {'reqs':>4} {'tok/s (min-max)':>22} {'vs base (min-max)':>20} "
        f"{'step ms':>8} {'ttft ms':>8} {'%bw':>6} {'%cached':>8}"
    )
    for r in report["results"]:
        if r["kind"] == "engine":
            tps = f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})"
            ratio = f"{r['vs_base_only']:.3f} ({r['vs_base_only_min']:.2f}-{r['vs_base_only_max']:.2f})"
        else:
            tps = f"{r['tokens_per_s']:.1f}" + (" capped" if r["capped_by_time"] else "")
            ratio = _fmt(r["vs_base_only"], ".3f")
        bw = r.get("fraction_of_bandwidth_limit")
        print(
            f"{r['name']:<58} {r['requests']:>4} {tps:>22} {ratio:>20} "
            f"{_fmt(r.get('decode_step_ms'), '.1f'):>8} {_fmt(r.get('ttft_ms'), '.0f'):>8} "
            f"{_fmt(None if bw is None else 100 * bw, '.1f'):>6} "
            f"{_fmt(None if (hit := r.get('prefix_cache_hit_rate')) is None else 100 * hit, '.0f'):>8}"
        )
