"""gRPC and HTTP share one lifecycle: one concurrency limit, one drain (in-process, engine double)."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.tiny_model import build_tiny_tokenizer
from tests.server.api.conftest import default_settings, start_in_process


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


async def test_one_stream_limit_and_one_drain_for_both_protocols(tokenizer):
    settings = default_settings(
        http_port=0,
        served_model_name="base",
        limits=LimitSettings(max_new_tokens=32, max_concurrent_streams=1),
    )
    server = await start_in_process(tokenizer, settings)
    server.engine.step_s = 0.05  # 32 tokens: ~1.6 s of streaming
    url = f"http://127.0.0.1:{server.app.ports.http}/v1"
    body = {"model": "base", "prompt": "Hello", "max_tokens": 32, "stream": True}
    stub = generation_pb2_grpc.GenerationStub(server.channel)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/completions", json=body) as response:
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Generate(generation_pb2.GenerateRequest(prompt="Hi"))
                assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                busy = await client.post("/completions", json={**body, "stream": False})
                assert busy.status_code == 429 and "max_concurrent_streams" in busy.json()["error"]["message"]

                server.app.request_stop()
                await asyncio.sleep(0.2)
                refused = await client.post("/completions", json={**body, "stream": False})
                assert refused.status_code == 503
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Generate(generation_pb2.GenerateRequest(prompt="Hi"))
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert await asyncio.wait_for(server.task, 30) == 0
    finally:
        await server.channel.close()
        if not server.task.done():
            await server.stop()
