"""The async engine API and per-request behaviour: streaming, cancel, limits, sampling, stops."""

from __future__ import annotations

import asyncio

import pytest

from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.provider import StaticAdapterProvider
from adapterserve.server.engine.types import FinishReason, GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError, NotFoundError, QueueFullError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter

SETTINGS = EngineSettings(max_batch_size=4, max_seq_len=64, max_queue=3, adapter_slots=2)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path_factory.mktemp("a") / "lora")


@pytest.fixture()
def offline(tiny_model_dir, lora_dir):
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), SETTINGS)
    engine.add_adapter("lora", lora_dir)
    return engine


def _req(i: int, adapter=None, **sampling) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 8)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(f"r{i}", (5 + i, 6, 7, 8), adapter, SamplingParams(**sampling))


async def test_stream_cancel_and_slot_release(tiny_model_dir, lora_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    provider = StaticAdapterProvider(base.spec, SETTINGS)
    provider.add("lora", lora_dir)
    engine = Engine(base, provider, SETTINGS)
    await engine.start()
    try:
        full = [ev async for ev in await engine.submit(_req(0, "lora", max_new_tokens=6))]
        assert [ev.finish_reason for ev in full] == [None] * 5 + [FinishReason.LENGTH]
        assert sum(len(ev.token_ids) for ev in full) == 6 and full[-1].generated_tokens == 6

        handle = await engine.submit(_req(1, "lora", max_new_tokens=50))
        first = await handle.__anext__()
        assert first.finish_reason is None and engine.stats().slots_in_use == 1
        handle.cancel()
        rest = [ev async for ev in handle]
        assert rest[-1].finish_reason == FinishReason.CANCELLED
        assert rest[-1].generated_tokens < 50
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.slots_in_use) == (0, 0, 0)

        with pytest.raises(NotFoundError):
            await engine.submit(_req(2, "nope"))

        # Concurrent streams from several tasks all complete, in order.
        async def consume(i):
            return [ev async for ev in await engine.submit(_req(i, "lora" if i % 2 else None))]

        outs = await asyncio.gather(*(consume(i) for i in range(3)))
        assert all(o[-1].finish_reason == FinishReason.LENGTH for o in outs)
    finally:
        await engine.stop()


def test_queue_bound_and_request_validation(offline):
    sink: list = []
    for i in range(SETTINGS.max_queue):
        offline.submit(_req(i), sink)
    with pytest.raises(QueueFullError):
        offline.submit(_req(99), sink)
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        offline.core.new_sequence(_req(1, max_new_tokens=100), None, sink.append)
    with pytest.raises(InvalidArgumentError, match="empty"):
        offline.core.new_sequence(GenerationRequest("x", ()), None, sink.append)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        offline.core.new_sequence(GenerationRequest("x", (10**6,)), None, sink.append)


def test_seeded_sampling_is_reproducible_and_batch_independent(offline):
    params = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=1234)
    alone = offline.generate([_req(0, "lora", **params)])[0].token_ids
    mixed = offline.generate([_req(1), _req(0, "lora", **params), _req(2, "lora", temperature=1.0)])
    assert mixed[1].token_ids == alone
    other_seed = offline.generate([_req(0, "lora", **{**params, "seed": 4321})])[0].token_ids
    assert other_seed != alone


def test_stop_sequence_and_eos(offline):
    greedy = offline.generate([_req(0, max_new_tokens=10)])[0]
    assert greedy.finish_reason == FinishReason.LENGTH and len(greedy.token_ids) == 10
    stop = greedy.text[len(greedy.text) // 2 :][:2]
    assert stop
    stopped = offline.generate([_req(0, max_new_tokens=10, stop=(stop,))])[0]
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.text == greedy.text[: greedy.text.find(stop)]
    # EOS: make the third greedy token the end-of-sequence token.
    offline.core.eos_ids = frozenset({greedy.token_ids[2]})
    ended = offline.generate([_req(0, max_new_tokens=10, ignore_eos=False)])[0]
    assert ended.finish_reason == FinishReason.EOS
    assert ended.token_ids == greedy.token_ids[:3]


async def test_pin_makes_an_adapter_resident_and_keeps_it(tiny_model_dir, lora_dir, tmp_path):
    """Pinning loads an adapter that is not resident into a device slot and keeps it there while
    other adapters come and go; at least one slot always stays unpinned."""
    from adapterserve.server.errors import ResourceExhaustedError

    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    settings = EngineSettings(max_batch_size=4, max_seq_len=64, max_queue=8, adapter_slots=2)
    provider = StaticAdapterProvider(base.spec, settings)
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        provider.add(name, make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / name, seed=i))
    engine = Engine(base, provider, settings)
    await engine.start()
    try:
        a = provider.resolve("a")
        assert not engine.is_resident("a", a.version)
        await engine.pin(a)
        assert engine.is_resident("a", a.version)
        with pytest.raises(ResourceExhaustedError, match="pinned"):
            await engine.pin(provider.resolve("b"))  # the last unpinned slot stays free
        for name in ("b", "c", "b", "c"):  # only one slot left for these two: they evict each other
            [ev async for ev in await engine.submit(_req(0, name, max_new_tokens=2))]
        assert engine.is_resident("a", a.version) and engine.stats().slot_evictions >= 3
        await engine.unpin("a", a.version)
        [ev async for ev in await engine.submit(_req(0, "b", max_new_tokens=2))]
        [ev async for ev in await engine.submit(_req(0, "c", max_new_tokens=2))]
        assert not engine.is_resident("a", a.version)  # unpinned: evicted like any other
    finally:
        await engine.stop()


async def test_event_relay_hands_a_step_over_in_one_wakeup_in_order():
    """Events emitted on the engine thread reach each handle in order, only after `flush`, and a whole
    step's events cost the event loop one wake-up (not one per row)."""
    from adapterserve.server.engine.engine import EventRelay, RequestHandle
    from adapterserve.server.engine.types import TokenEvent

    loop = asyncio.get_running_loop()
    wakeups = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args):
        if args and isinstance(args[0], list):  # the relay's batches (to_thread schedules its own too)
            wakeups.append(len(args[0]))
        return real(callback, *args)

    loop.call_soon_threadsafe = counting
    try:
        relay = EventRelay(loop)
        handles = [RequestHandle(engine=None, request_id=f"r{i}") for i in range(8)]

        def engine_step(step: int) -> None:  # what the engine thread does: emit per row, then flush
            for handle in handles:
                relay.emit(
                    handle,
                    TokenEvent(token_ids=(step,), text=str(step), prompt_tokens=1, generated_tokens=step),
                )
            relay.flush()

        await asyncio.to_thread(engine_step, 1)
        await asyncio.to_thread(engine_step, 2)
        await asyncio.sleep(0)
        assert wakeups == [8, 8]
        for handle in handles:
            got = [await asyncio.wait_for(handle._queue.get(), 1) for _ in range(2)]
            assert [e.token_ids for e in got] == [(1,), (2,)]
        relay.flush()  # nothing buffered: no wake-up
        assert wakeups == [8, 8]
    finally:
        del loop.call_soon_threadsafe
