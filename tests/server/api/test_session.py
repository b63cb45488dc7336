"""The transport-neutral GenerationSession on the engine double: admission, events, cancel on an early end,
the drain's cut, and the metrics both transports record through it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from adapterserve.server.api.lifecycle import DRAINING_MESSAGE, Lifecycle, Phase
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import Runtime, RuntimeRef
from adapterserve.server.api.session import Sessions
from adapterserve.server.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from adapterserve.server.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from adapterserve.v1 import generation_pb2
from tests.server.api.doubles import FakeCatalog, FakeEngine

pytestmark = pytest.mark.timeout(30)


def request(tokens: int = 3, adapter: str | None = None, n: int = 1) -> GenerationRequest:
    return GenerationRequest("r", (1, 2, 3, 4), adapter, SamplingParams(max_new_tokens=tokens), n=n)


@pytest.fixture
def setup():
    engine = FakeEngine(FakeCatalog(), step_s=0.001)
    runtime = RuntimeRef(Runtime(engine, object(), engine.catalog, generation_pb2.ServerInfo()))
    lifecycle = Lifecycle(max_generations=1)
    lifecycle.phase = Phase.SERVING
    metrics = ServerMetrics()
    return Sessions(runtime, metrics, lifecycle), engine, metrics, lifecycle


def sample(metrics: ServerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_call_relays_its_events_and_records_its_metrics(setup):
    sessions, engine, metrics, lifecycle = setup
    session = sessions.open("completions", "", protocol="http")
    events = [e async for e in session.events(lambda _tokenizer: request(3))]
    assert [e.token_ids for e in events] == [(10,), (11,), (12,)]
    assert session.finish_reason is FinishReason.LENGTH and session.status == "OK"
    assert (session.prompt_tokens, session.generated_tokens) == (4, 3)
    ttft, total = session.timing()
    assert 0 < ttft <= total
    assert lifecycle.calls_in_flight == 0 and engine.cancelled == []
    labels = {"protocol": "http", "method": "completions", "adapter": "base", "status": "OK"}
    assert sample(metrics, "adapterserve_requests_total", **labels) == 1
    assert sample(metrics, "adapterserve_prompt_tokens_total", adapter="base") == 4
    assert sample(metrics, "adapterserve_generated_tokens_total", adapter="base") == 3
    assert sample(metrics, "adapterserve_time_to_first_token_seconds_count", adapter="base") == 1
    assert sample(metrics, "adapterserve_time_per_output_token_seconds_count", adapter="base") == 1


async def test_an_early_end_cancels_the_engine_work_and_counts_a_cancel_or_a_deadline(setup):
    sessions, engine, metrics, lifecycle = setup
    for deadline, status in ((False, "CANCELLED"), (True, "DEADLINE_EXCEEDED")):
        session = sessions.open("GenerateStream", None, deadline_passed=lambda d=deadline: d)
        async with contextlib.aclosing(session.events(lambda _t: request(30))) as events:
            await anext(events)
        assert session.status == status and lifecycle.calls_in_flight == 0
        labels = {"protocol": "grpc", "method": "GenerateStream", "adapter": "base", "status": status}
        assert sample(metrics, "adapterserve_requests_total", **labels) == 1
    assert len(engine.cancelled) == 2 and not engine.running
    assert sample(metrics, "adapterserve_generated_tokens_total", adapter="base") == 0  # only finished calls


async def test_refusals_are_recorded_with_their_code_and_the_adapter_label(setup):
    sessions, engine, metrics, lifecycle = setup

    def bad(_tokenizer):
        raise InvalidArgumentError("sampling.temperature: -1 is outside 0..100")

    with pytest.raises(InvalidArgumentError):
        [e async for e in sessions.open("Generate", "x").events(bad)]
    with pytest.raises(NotFoundError):
        [e async for e in sessions.open("Generate", "x").events(lambda _t: request(adapter="nope"))]
    # one generation at a time (max_concurrent_streams=1): the second is refused while the first runs
    first = sessions.open("Generate", None).events(lambda _t: request(30))
    await anext(first)
    with pytest.raises(ResourceExhaustedError):
        [e async for e in sessions.open("Generate", None).events(lambda _t: request())]
    await first.aclose()
    for status in ("INVALID_ARGUMENT", "NOT_FOUND"):
        labels = {"protocol": "grpc", "method": "Generate", "adapter": "other", "status": status}
        assert sample(metrics, "adapterserve_requests_total", **labels) == 1
    labels = {"protocol": "grpc", "method": "Generate", "adapter": "base", "status": "RESOURCE_EXHAUSTED"}
    assert sample(metrics, "adapterserve_requests_total", **labels) == 1
    lifecycle.phase = Phase.DRAINING
    with pytest.raises(UnavailableError, match="shutting down"):
        [e async for e in sessions.open("Generate", None).events(lambda _t: request())]


async def test_the_drain_cut_ends_a_running_call_as_unavailable(setup):
    sessions, engine, metrics, lifecycle = setup
    session = sessions.open("GenerateStream", None)
    events = session.events(lambda _t: request(30))
    await anext(events)
    assert lifecycle.cut() == 1
    with pytest.raises(UnavailableError) as info:
        async for _ in events:
            pass
    assert str(info.value) == DRAINING_MESSAGE and session.status == "UNAVAILABLE"
    assert engine.cancelled == ["r"] and lifecycle.calls_in_flight == 0


async def test_n_choices_end_when_every_choice_has_ended_and_a_local_answer_skips_the_engine(setup):
    sessions, engine, metrics, lifecycle = setup

    class TwoChoices:
        def cancel(self) -> None:
            raise AssertionError("a finished call is not cancelled")

        async def __aiter__(self):
            yield TokenEvent((5,), "a", index=0)
            yield TokenEvent((6,), "b", FinishReason.LENGTH, 4, 2, index=1)
            yield TokenEvent((7,), "c", FinishReason.EOS, 4, 2, index=0)
            await asyncio.sleep(10)  # never read: the call ended with its last choice

    async def submit(_request):
        return TwoChoices()

    engine.submit = submit
    session = sessions.open("Generate", None)
    events = [e async for e in session.events(lambda _t: request(n=2))]
    assert len(events) == 3 and session.finish_reason is FinishReason.EOS and session.generated_tokens == 3
    local = TokenEvent((), "", FinishReason.SCORED, prompt_tokens=1)
    session = sessions.open("completions", "", protocol="http")
    assert [e async for e in session.events(lambda _t: request(), lambda _r: local)] == [local]
    assert session.status == "OK" and session.finish_reason is FinishReason.SCORED


async def test_closing_the_events_after_the_final_one_is_a_served_call_not_a_cancel(setup):
    """HTTP's SSE loop stops reading at the final event and closes the iterator."""
    sessions, engine, metrics, lifecycle = setup
    session = sessions.open("completions", "", protocol="http")
    async with contextlib.aclosing(session.events(lambda _t: request(2))) as events:
        async for _event in events:
            if session.finish_reason is not None:
                break
    assert session.status == "OK" and engine.cancelled == []
    labels = {"protocol": "http", "method": "completions", "adapter": "base", "status": "OK"}
    assert sample(metrics, "adapterserve_requests_total", **labels) == 1
    assert sample(metrics, "adapterserve_generated_tokens_total", adapter="base") == 2
