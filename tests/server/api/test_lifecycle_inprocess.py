"""Health transitions, reflection, metrics scraping and the graceful drain (in-process, engine double)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.server.api.conftest import default_settings, start_in_process, wait_until

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_not_serving_until_loaded_then_serving(tiny_tokenizer):
    gate = asyncio.Event()
    server = await start_in_process(tiny_tokenizer, default_settings(), gate=gate, wait_serving=False)
    try:
        assert await health_of(server.channel) == NOT_SERVING
        gen = generation_pb2_grpc.GenerationStub(server.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gen.Generate(generation_pb2.GenerateRequest(prompt="hi"))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
        gate.set()
        await wait_until(lambda: server.factory.engine is not None)
        for _ in range(200):
            if await health_of(server.channel) == SERVING:
                break
            await asyncio.sleep(0.02)
        assert await health_of(server.channel, "adapterserve.v1.Generation") == SERVING
        assert (await gen.Generate(generation_pb2.GenerateRequest(prompt="hi"))).generated_tokens > 0
    finally:
        await server.channel.close()
        await server.stop()


async def test_reflection_lists_every_service(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in reply.list_services_response.service}
    assert {
        "adapterserve.v1.Generation",
        "adapterserve.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def scrape(url: str) -> dict[str, list]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def sample_value(families, family: str, sample: str, **labels) -> float:
    for s in families[family]:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample} {labels} in {families[family]}")


async def test_metrics_endpoint_scraped_and_parsed(served):
    gen = generation_pb2_grpc.GenerationStub(served.channel)
    admin = admin_pb2_grpc.AdminStub(served.channel)
    await gen.Generate(
        generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=4))
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await gen.Generate(generation_pb2.GenerateRequest(prompt="hi", adapter="missing"))
    with pytest.raises(grpc.aio.AioRpcError):
        await admin.UploadAdapter(iter([admin_pb2.UploadAdapterRequest()]), metadata=served.admin_md())
    families = await asyncio.to_thread(scrape, served.metrics_url)
    assert (
        sample_value(
            families, "adapterserve_requests", "adapterserve_requests_total", adapter="base", status="OK"
        )
        == 1
    )
    assert (
        sample_value(
            families,
            "adapterserve_requests",
            "adapterserve_requests_total",
            adapter="other",
            status="NOT_FOUND",
        )
        == 1
    )
    assert (
        sample_value(
            families, "adapterserve_generated_tokens", "adapterserve_generated_tokens_total", adapter="base"
        )
        == 4
    )
    assert (
        sample_value(
            families,
            "adapterserve_time_to_first_token_seconds",
            "adapterserve_time_to_first_token_seconds_count",
            adapter="base",
        )
        == 1
    )
    assert (
        sample_value(
            families,
            "adapterserve_time_per_output_token_seconds",
            "adapterserve_time_per_output_token_seconds_count",
            adapter="base",
        )
        == 1
    )
    assert (
        sample_value(
            families, "adapterserve_uploads", "adapterserve_uploads_total", status="INVALID_ARGUMENT"
        )
        == 1
    )
    assert sample_value(families, "adapterserve_running_requests", "adapterserve_running_requests") == 0
    assert sample_value(families, "adapterserve_queue_depth", "adapterserve_queue_depth") == 0
    assert (
        sample_value(
            families, "adapterserve_adapter_cache_hits", "adapterserve_adapter_cache_hits_total", tier="host"
        )
        == 3
    )
    assert (
        sample_value(
            families, "adapterserve_adapter_cache_bytes", "adapterserve_adapter_cache_bytes", tier="host"
        )
        == 1234
    )


async def test_drain_finishes_running_calls_refuses_new_ones_and_exits_zero(served):
    gen = generation_pb2_grpc.GenerationStub(served.channel)
    served.engine.step_s = 0.05
    running = gen.GenerateStream(
        generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=20))
    )
    await running.read()
    served.app.request_stop()
    await wait_until(lambda: served.app.lifecycle.phase.value == "draining")
    assert await health_of(served.channel) == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gen.Generate(generation_pb2.GenerateRequest(prompt="hi"))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    rest = []
    while (message := await running.read()) is not grpc.aio.EOF:
        rest.append(message)
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH and rest[-1].generated_tokens == 20
    assert await asyncio.wait_for(served.task, 10) == 0
    assert served.factory.stopped


async def test_drain_past_grace_cancels_engine_work(tiny_tokenizer):
    server = await start_in_process(tiny_tokenizer, default_settings(grace_seconds=0.3))
    gen = generation_pb2_grpc.GenerationStub(server.channel)
    server.engine.step_s = 0.1
    call = gen.GenerateStream(
        generation_pb2.GenerateRequest(
            prompt="hi", request_id="slow", sampling=generation_pb2.SamplingParams(max_new_tokens=30)
        )
    )
    await call.read()
    assert await server.stop() == 0
    assert "slow" in server.engine.cancelled and not server.engine.running
    await server.channel.close()


async def test_port_in_use_fails_with_a_clear_message(served, tiny_tokenizer, caplog):
    from adapterserve.server.api.serve import ServeApp

    taken = default_settings(port=served.app.ports.grpc)
    app = ServeApp(taken, runtime_factory=served.factory)
    assert await app.run(handle_signals=False) == 1
    assert "could not bind the gRPC port" in caplog.text
