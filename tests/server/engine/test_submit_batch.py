"""Engine.submit_batch: several ordinary requests (a list of prompts) queued together, all or none."""

from __future__ import annotations

import pytest

from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.provider import StaticAdapterProvider
from adapterserve.server.engine.types import FinishReason, GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError, NotFoundError, QueueFullError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings

SETTINGS = EngineSettings(max_batch_size=8, max_seq_len=64, max_queue=3, adapter_slots=2)


def _req(
    i: int, n: int = 1, adapter: str | None = None, prompt_len: int = 4, **sampling
) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 6)
    sampling.setdefault("ignore_eos", True)
    prompt = tuple(5 + (i + k) % 40 for k in range(prompt_len))
    return GenerationRequest(f"b{i}", prompt, adapter, SamplingParams(**sampling), n=n)


@pytest.fixture
async def engine(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = Engine(base, StaticAdapterProvider(base.spec, SETTINGS), SETTINGS)
    await engine.start()
    yield engine
    await engine.stop()


async def _tokens(handle) -> dict[int, tuple[int, ...]]:
    out: dict[int, tuple[int, ...]] = {}
    async for event in handle:
        assert event.finish_reason in (None, FinishReason.LENGTH)
        out[event.index] = out.get(event.index, ()) + event.token_ids
    return out


async def test_a_batch_gives_what_each_request_gives_alone(engine):
    requests = [_req(0, n=2, temperature=1.0, seed=3), _req(1), _req(2, n=2, temperature=1.0, seed=9)]
    handles = await engine.submit_batch(requests)
    batched = [await _tokens(h) for h in handles]
    alone = [await _tokens(await engine.submit(r)) for r in requests]
    assert batched == alone
    assert [len(b) for b in batched] == [2, 1, 2]
    assert engine.stats().running == engine.stats().waiting == 0


async def test_one_bad_request_refuses_the_batch_before_any_is_queued(engine):
    steps = engine.stats().steps
    too_long = _req(1, prompt_len=60)  # 60 + 6 new tokens > max_seq_len 64
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        await engine.submit_batch([_req(0), too_long, _req(2)])
    with pytest.raises(NotFoundError):
        await engine.submit_batch([_req(0), _req(1, adapter="no-such-adapter")])
    with pytest.raises(InvalidArgumentError, match="waiting queue holds"):
        await engine.submit_batch([_req(i) for i in range(4)])  # more than max_queue (3), ever
    stats = engine.stats()
    assert (stats.waiting, stats.running, stats.steps) == (0, 0, steps)


def test_the_queue_takes_a_batch_whole_or_not_at_all(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = Engine(base, StaticAdapterProvider(base.spec, SETTINGS), SETTINGS)  # not started: nothing runs
    core = engine.core

    def seq(i: int):
        return core.new_sequence(_req(i), None, lambda event: None)

    core.add(seq(0))
    with pytest.raises(QueueFullError, match="no room for 3"):
        core.add_all([seq(1), seq(2), seq(3)])
    assert [s.request.request_id for s in core.waiting] == ["b0"]
    core.add_all([seq(1), seq(2)])
    assert [s.request.request_id for s in core.waiting] == ["b0", "b1", "b2"]
