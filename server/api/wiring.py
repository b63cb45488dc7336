"""Build the real runtime for `adapterserve serve`: base model, store, host cache, engine, warm-up.

This is the default RuntimeFactory of ServeApp. Heavy imports (torch, transformers) happen here, after
the gRPC port is already listening with health NOT_SERVING.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from typing import Any

from adapterserve.server.adapters.kind import kind_names
from adapterserve.server.api.catalog import StoreCatalog
from adapterserve.server.api.grpc.convert import adapter_kind_to_proto
from adapterserve.server.api.metrics import RuntimeSnapshot, TierStats
from adapterserve.server.api.runtime import Runtime, StartedRuntime
from adapterserve.server.cpu.threads import ThreadPlan, apply_threads, plan_threads
from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.settings import LimitSettings, ServerSettings
from adapterserve.v1 import generation_pb2

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"


def server_version() -> str:
    try:
        return metadata.version("adapterserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def server_info(base: Any, limits: LimitSettings) -> generation_pb2.ServerInfo:
    """What GetServerInfo answers for this base and these limits."""
    return generation_pb2.ServerInfo(
        server_version=server_version(),
        base_model=str(base.source),
        base_fingerprint=base.fingerprint,
        model_type=base.spec.model_type,
        quantize=str(base.quantize),
        adapter_kinds=[adapter_kind_to_proto(k) for k in kind_names()],
        limits=generation_pb2.Limits(
            max_prompt_tokens=limits.max_prompt_tokens,
            max_new_tokens=limits.max_new_tokens,
            max_stop_sequences=limits.max_stop_sequences,
            max_n=limits.max_n,
            max_logprobs=limits.max_logprobs,
            max_batch_rows=limits.max_batch_rows,
            max_batch_tokens=limits.max_batch_tokens,
            max_upload_bytes=limits.max_upload_bytes,
            max_message_bytes=limits.max_message_bytes,
            upload_chunk_bytes=limits.upload_chunk_bytes,
            max_concurrent_streams=limits.max_concurrent_streams,
        ),
        chat_template=bool(getattr(base.tokenizer, "chat_template", None)),
    )


async def warm_up(engine: Any, tokenizer: Any) -> None:
    """One tiny greedy generation through the whole path (prefill and decode) before serving."""
    ids = tuple(tokenizer(WARMUP_PROMPT, add_special_tokens=True)["input_ids"]) or (0,)
    handle = await engine.submit(
        GenerationRequest(request_id="warmup", prompt_ids=ids, sampling=SamplingParams(max_new_tokens=2))
    )
    async for event in handle:
        if event.finish_reason is not None:
            if event.error is not None:
                raise event.error
            break


def snapshot_of(engine: Any, registry: Any) -> RuntimeSnapshot:
    """Engine gauges and the host/device cache tiers, for the metrics endpoint."""
    stats = engine.stats()
    cache = registry.stats()
    sources = getattr(registry, "sources", None)  # the SourceFetcher, None without adapter sources
    return RuntimeSnapshot(
        queue_depth=stats.waiting,
        running_requests=stats.running,
        slots_in_use=stats.slots_in_use,
        slots_total=stats.slots_total,
        decode_step=stats.decode_step,
        decode_graph_captures=stats.decode_graph_captures,
        decode_graph_replays=stats.decode_graph_replays,
        decode_static_steps=stats.decode_static_steps,
        decode_fallback=stats.decode_fallback is not None,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        prefix_cache_evictions=stats.prefix_cache_evictions,
        prefix_cache_blocks=stats.prefix_cache_blocks,
        tiers={
            "device": TierStats(
                hits=stats.slot_hits,
                misses=stats.slot_loads,
                evictions=stats.slot_evictions,
                bytes=stats.adapter_device_bytes,
                entries=stats.slots_in_use,
            ),
            "host": TierStats(
                hits=cache.hits,
                misses=cache.misses,
                evictions=cache.evictions,
                bytes=cache.host_bytes,
                entries=cache.host_entries,
                capacity_bytes=cache.host_capacity_bytes,
            ),
            "disk": TierStats(
                bytes=cache.disk_bytes,
                entries=cache.disk_adapters,
                evictions=sources.disk.evictions if sources else 0,
            ),
        },
        fetch=sources.stats if sources else None,
        fetched_disk_bytes=sources.disk.bytes() if sources else 0,
    )


def cpu_plan(settings: ServerSettings, device_type: str) -> ThreadPlan | None:
    """The engine's CPU thread plan (None on a GPU), logged, and applied to this thread too."""
    if device_type != "cpu":
        return None
    cpu = settings.engine.cpu
    plan = plan_threads(cpu.threads, cpu.wait_policy, cpu.governor, prefill_threads=cpu.prefill_threads)
    log.info(plan.describe())
    apply_threads(plan.threads)
    return plan


def source_fetcher(store: Any, settings: ServerSettings) -> Any:
    """The SourceFetcher of the configured adapter sources (store/sources/), or None without any."""
    if not settings.sources.uris:
        return None
    from adapterserve.server.store.sources import parse_source
    from adapterserve.server.store.sources.fetcher import SourceFetcher

    timeout = settings.sources.fetch_timeout_s
    fetcher = SourceFetcher(
        store, [parse_source(u, timeout_s=timeout) for u in settings.sources.uris], settings.sources
    )
    log.info("adapter sources, tried in order: %s", fetcher.describe())
    return fetcher


async def start_runtime(settings: ServerSettings) -> StartedRuntime:
    """Load the base, open the store, add demo adapters if asked, start and warm the engine."""
    from adapterserve.server.adapters.loader import build_adapter, load_adapter_dir
    from adapterserve.server.cpu.omp_pools import run_releasing_pool
    from adapterserve.server.engine.engine import Engine
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.store.live import LiveAdapters
    from adapterserve.server.store.registry import AdapterRegistry
    from adapterserve.server.store.store import AdapterStore
    from adapterserve.server.store.upload import UploadRequest

    base = await run_releasing_pool(
        load_base_model,
        settings.base_model,
        quantize=settings.quantize,
        dtype=settings.dtype,
        device=settings.device,
    )
    validate = functools.partial(
        load_adapter_dir, spec=base.spec, settings=settings.engine, max_bytes=settings.cache.max_adapter_bytes
    )
    store = await run_releasing_pool(
        AdapterStore,
        settings.store,
        validate,
        base_fingerprint=base.fingerprint,
        max_adapter_bytes=settings.cache.max_adapter_bytes,
    )
    for name, why in store.scan_report.failed.items():
        log.warning("store entry %r is not served: %s", name, why)
    if settings.demo_adapters:
        from adapterserve.server.api.demo import ensure_demo_adapters

        def put(src: Any, name: str) -> Any:
            kind = "random init" if name.startswith("demo-") else "trained by demo/train_demo_adapters.sh"
            return store.put_dir(
                src, UploadRequest(name, description=f"demo adapter ({kind}; adapterserve --demo-adapters)")
            )

        await run_releasing_pool(ensure_demo_adapters, base, put, set(store.names()))
    registry = AdapterRegistry(store, settings.cache, sources=source_fetcher(store, settings))
    build = functools.partial(build_adapter, spec=base.spec, settings=settings.engine)
    live = LiveAdapters(registry, build, persist_every=settings.cache.persist_every)
    engine = Engine(base, live, settings.engine, cpu=cpu_plan(settings, base.device.type))
    await engine.start()
    try:
        await warm_up(engine, base.tokenizer)
    except BaseException:
        await engine.stop()
        raise

    catalog = StoreCatalog(
        registry,
        device_resident=engine.is_resident,
        pin_device=engine.pin,
        unpin_device=engine.unpin,
        forget_device=engine.forget,
        live=live,
        preload_device=engine.preload,
    )
    restored = await catalog.restore_pins()
    if restored:
        log.info("pinned adapters restored: %s", ", ".join(restored))
    runtime = Runtime(
        engine=engine,
        tokenizer=base.tokenizer,
        catalog=catalog,
        server_info=server_info(base, settings.limits),
    )
    log.info("store %s: %d adapter(s) served", store.root, len(store))

    async def stop() -> None:
        await engine.stop()
        if registry.sources is not None:
            await registry.sources.close()

    return StartedRuntime(runtime=runtime, snapshot=lambda: snapshot_of(engine, registry), stop=stop)
