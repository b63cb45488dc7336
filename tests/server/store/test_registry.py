"""The host-RAM cache: LRU order by bytes, pinning, single-flight loads, replace/delete during a
running request, counters and events; 1,000 stored adapters served by name without holding them all."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import tracemalloc
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adapterserve.server.errors import AdapterValidationError, InvalidArgumentError, NotFoundError
from adapterserve.server.settings import CacheSettings
from adapterserve.server.store.registry import AdapterRegistry, CacheEvent
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import UploadRequest
from tests.helpers.peft_adapters import write_lora_dir
from tests.server.store.validators import make_validator

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture
def filled_store(make_store, lora_dirs):
    """A store holding a, b, c, d (one LoRA each, same size)."""
    store = make_store()
    for name, d in zip("abcd", lora_dirs, strict=True):
        store.put_dir(d, UploadRequest(name))
    return store


def one_size(store: AdapterStore) -> int:
    return store.manifest("a").nbytes


def registry_for(store: AdapterStore, entries: float, **kw) -> AdapterRegistry:
    return AdapterRegistry(store, CacheSettings(host_cache_bytes=int(one_size(store) * entries)), **kw)


async def test_hit_miss_and_lru_order_under_a_byte_budget(filled_store):
    events: list[CacheEvent] = []
    reg = registry_for(filled_store, 2.5, listener=events.append)  # room for two adapters
    a = await reg.get("a")
    assert a.name == "a" and a.version == 1 and a.info.rank == 2
    assert torch.equal(a.weights[next(iter(a.weights))], a.adapter.tensors[next(iter(a.adapter.tensors))])
    await reg.get("b")
    assert await reg.get("a") is a  # hit: the same object
    assert reg.cached_names() == ["b", "a"]  # a is most recent
    await reg.get("c")  # evicts b, the least recently used
    assert reg.cached_names() == ["a", "c"]
    assert reg.tier("b") == "disk" and reg.tier("a") == "host"
    s = reg.stats()
    assert (s.hits, s.misses, s.loads, s.evictions) == (1, 3, 3, 1)
    assert s.host_bytes == 2 * one_size(filled_store) <= s.host_capacity_bytes
    assert (s.host_entries, s.disk_adapters) == (2, 4) and s.disk_bytes > 0
    kinds = [(e.kind, e.name) for e in events]
    assert kinds == [
        ("miss", "a"), ("load", "a"), ("miss", "b"), ("load", "b"), ("hit", "a"),
        ("miss", "c"), ("load", "c"), ("evict", "b"),
    ]  # fmt: skip


async def test_byte_limit_is_never_exceeded_and_zero_budget_caches_nothing(filled_store):
    reg = registry_for(filled_store, 1.9)
    for name in "abcdabcd":
        await reg.get(name)
        assert reg.stats().host_bytes <= reg.capacity
    assert reg.cached_names() == ["d"]
    none = AdapterRegistry(filled_store, CacheSettings(host_cache_bytes=0))
    assert (await none.get("a")).name == "a"
    assert none.cached_names() == [] and none.stats().loads == 1


async def test_pinned_adapters_are_never_evicted(filled_store):
    reg = registry_for(filled_store, 2.5)
    await reg.pin("a")
    for name in "bcdbcd":
        await reg.get(name)
        assert "a" in reg.cached_names()
    assert reg.is_pinned("a") and reg.stats().pinned == 1
    reg.unpin("a")
    await reg.get("b")
    await reg.get("c")
    assert "a" not in reg.cached_names()


async def test_pinned_adapter_larger_than_the_budget_is_kept(filled_store):
    reg = registry_for(filled_store, 0.5)
    await reg.get("a")
    assert reg.cached_names() == []  # too big for the tier, not kept
    await reg.pin("a")
    assert reg.cached_names() == ["a"]
    await reg.get("b")
    assert reg.cached_names() == ["a"]


async def test_concurrent_gets_of_a_cold_adapter_load_once(spec, make_store, lora_dirs):
    calls: list[Path] = []
    inner = make_validator(spec)
    gate = threading.Event()

    def slow_validate(path: Path):
        calls.append(path)
        gate.wait(5)  # hold the load until every request is waiting on it
        return inner(path)

    store = make_store(validate=inner)
    store.put_dir(lora_dirs[0], UploadRequest("cold"))
    store._validate = slow_validate  # the registry's loads go through the store's validator
    reg = AdapterRegistry(store)
    tasks = [asyncio.create_task(reg.get("cold")) for _ in range(50)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    s = reg.stats()
    assert (s.loads, s.misses, s.hits) == (1, 50, 0)


async def test_a_cancelled_waiter_does_not_cancel_the_shared_load(spec, make_store, lora_dirs):
    inner = make_validator(spec)
    gate = threading.Event()
    store = make_store(validate=inner)
    store.put_dir(lora_dirs[0], UploadRequest("cold"))
    store._validate = lambda p: (gate.wait(5), inner(p))[1]
    reg = AdapterRegistry(store)
    first = asyncio.create_task(reg.get("cold"))
    second = asyncio.create_task(reg.get("cold"))
    await asyncio.sleep(0.02)
    first.cancel()
    gate.set()
    assert (await second).name == "cold"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert reg.stats().loads == 1


async def test_failed_load_reaches_every_waiter_and_is_retried_later(spec, make_store, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("x"))
    w = store.root / "x" / WEIGHTS
    good = w.read_bytes()
    w.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    events: list[CacheEvent] = []
    reg = AdapterRegistry(store, listener=events.append)
    results = await asyncio.gather(*(reg.get("x") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, AdapterValidationError) and "changed on disk" in str(r) for r in results)
    assert reg.stats().load_failures == 1 and [e.kind for e in events].count("load_failed") == 1
    w.write_bytes(good)
    assert (await reg.get("x")).name == "x"


async def test_replace_during_a_running_request_keeps_its_weights(filled_store, lora_dirs):
    reg = AdapterRegistry(filled_store)
    running = await reg.get("a")  # a request holds version 1
    old_tensor = running.weights[next(iter(running.weights))].clone()

    async def stream():
        for fname in (CONFIG, WEIGHTS):
            yield fname, (lora_dirs[3] / fname).read_bytes()

    result = await reg.upload(UploadRequest("a", overwrite=True), stream())
    assert result.manifest.version == 2
    fresh = await reg.get("a")
    assert fresh.version == 2 and fresh is not running and fresh.key == ("a", 2)
    # the running request still sees version 1, unchanged
    assert running.version == 1 and torch.equal(running.weights[next(iter(running.weights))], old_tensor)
    assert not torch.equal(fresh.weights[next(iter(fresh.weights))], old_tensor)
    assert reg.cached_names().count("a") == 1


async def test_delete_during_a_running_request(filled_store):
    reg = AdapterRegistry(filled_store)
    await reg.pin("b")
    running = await reg.get("b")
    tensor = running.weights[next(iter(running.weights))].clone()
    await reg.delete("b")
    with pytest.raises(NotFoundError, match="'b' not found"):
        await reg.get("b")
    assert torch.equal(running.weights[next(iter(running.weights))], tensor)
    assert "b" not in reg.cached_names() and not reg.is_pinned("b")


async def test_store_changed_behind_the_registry_is_not_served_stale(filled_store, lora_dirs):
    reg = AdapterRegistry(filled_store)
    v1 = await reg.get("c")
    filled_store.put_dir(lora_dirs[0], UploadRequest("c", overwrite=True))  # not through the registry
    v2 = await reg.get("c")
    assert (v1.version, v2.version) == (1, 2) and v2.uid != v1.uid


async def test_unknown_and_malformed_names(filled_store):
    reg = AdapterRegistry(filled_store)
    with pytest.raises(NotFoundError, match="'nope' not found"):
        await reg.get("nope")
    for bad in ["../a", "", "a/b", ".hidden", "x" * 200]:
        with pytest.raises(InvalidArgumentError):
            await reg.get(bad)
    with pytest.raises(NotFoundError):
        await reg.pin("nope")


def test_thousand_adapters_listed_and_served_without_holding_them_all(spec, tmp_path):
    """1,000 LoRA adapters (r=2 on q,v of the tiny base, ~6 KiB of tensors each) in the store."""
    src = write_lora_dir(tmp_path / "src", spec, seed=1)
    config, weights = (src / CONFIG).read_bytes(), (src / WEIGHTS).read_bytes()
    root = tmp_path / "store"
    validate = make_validator(spec)
    # Fill the store directly in PEFT layout through the store's own upload path, 1,000 times.
    store = AdapterStore(root, validate)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:  # uploads are fsync-bound: overlap them
        list(
            pool.map(
                lambda i: store.upload(
                    UploadRequest(f"task-{i:04d}"), [(CONFIG, config), (WEIGHTS, weights)]
                ),
                range(1000),
            )
        )
    fill_s = time.perf_counter() - t0

    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    store = AdapterStore(root, validate)  # restart: scan + verify 1,000 adapters
    open_s = time.perf_counter() - t0
    one = store.manifest("task-0000").nbytes
    reg = AdapterRegistry(store, CacheSettings(host_cache_bytes=32 * one))
    alive: list[weakref.ref] = []

    async def serve_all():
        for i in range(1000):
            r = await reg.get(f"task-{i:04d}")
            assert r.name == f"task-{i:04d}" and r.info.rank == 2
            alive.append(weakref.ref(r.adapter))
            del r

    t0 = time.perf_counter()
    asyncio.run(serve_all())
    serve_s = time.perf_counter() - t0
    gc.collect()
    python_heap, _ = tracemalloc.get_traced_memory()  # manifests, registry, everything Python allocates
    tracemalloc.stop()
    rss_after = rss_bytes()
    held = sum(ref() is not None for ref in alive)
    stats = reg.stats()
    all_in_memory = 1000 * one
    print(
        f"\n1000 adapters: fill {fill_s:.1f}s, open+verify {open_s:.1f}s, serve {serve_s:.1f}s; all tensors {all_in_memory / 1024:.0f} KiB; "
        f"held after serving all: {held} adapters, host tier {stats.host_bytes / 1024:.0f} KiB; "
        f"Python heap {python_heap / 1024:.0f} KiB; RSS growth {(rss_after - rss_before) / 1024:.0f} KiB"
    )
    assert len(store.names()) == 1000 and stats.disk_adapters == 1000
    assert stats.loads == 1000 and stats.host_entries == 32 and stats.evictions == 968
    assert stats.host_bytes <= 32 * one
    assert held == 32  # only the cached ones are alive; the other 968 were freed
    assert python_heap < 4 << 20  # 1,000 manifests + the cache bookkeeping stay small


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_pins_are_persisted_and_stale_pin_writes_cleaned(make_store, lora_dirs, tmp_path):
    """The registry's pins are written to the store's pins file atomically and read back on open;
    a pins write that never got renamed is removed at open; an unreadable pins file is ignored."""
    from adapterserve.server.settings import CacheSettings
    from adapterserve.server.store.registry import AdapterRegistry
    from adapterserve.server.store.store import PINS_FILE

    root = tmp_path / "store"
    store = make_store()
    for i, d in enumerate(lora_dirs[:2]):
        store.put_dir(d, UploadRequest(f"a{i}"))
    registry = AdapterRegistry(store, CacheSettings())
    await registry.pin("a0")
    await registry.pin("a1")
    registry.unpin("a1")
    (root / f"{PINS_FILE}.deadbeef.tmp").write_text("{}")
    reopened = make_store()
    assert not (root / f"{PINS_FILE}.deadbeef.tmp").exists()
    assert reopened.pinned_names() == ["a0"]
    assert AdapterRegistry(reopened, CacheSettings()).is_pinned("a0")
    await AdapterRegistry(reopened, CacheSettings()).delete("a0")
    assert make_store().pinned_names() == []
    (root / PINS_FILE).write_text("{not json")
    assert make_store().pinned_names() == []


async def test_an_upload_is_validated_once_and_its_first_request_is_a_host_hit(spec, tmp_path, lora_dirs):
    calls: list[Path] = []
    store = AdapterStore(tmp_path / "store", make_validator(spec, calls=calls))
    reg = AdapterRegistry(store)

    async def stream():
        for fname in (CONFIG, WEIGHTS):
            yield fname, (lora_dirs[0] / fname).read_bytes()

    result = await reg.upload(UploadRequest("fresh"), stream())
    assert len(calls) == 1  # the one validation, on the upload's temporary folder
    resolved = await reg.get("fresh")
    assert resolved.adapter is result.validated and resolved.version == result.manifest.version
    assert len(calls) == 1 and reg.tier("fresh") == "host"
    s = reg.stats()
    assert (s.hits, s.misses, s.loads) == (1, 0, 0)  # never re-read, re-hashed or re-validated
