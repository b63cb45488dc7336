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


async def test_an_idle_keep_alive_connection_outlives_client_pool_timeouts(tokenizer, monkeypatch):
    # aiohttp (AIPerf's client) keeps idle connections 15 s; uvicorn's default closed them after 5 s,
    # and a request sent on one as it closed failed. Scaled down: the server's keep-alive, set to 2 s,
    # must hold a connection left idle past uvicorn's default-like 1 s.
    from adapterserve.server.api.http import server as http_server

    monkeypatch.setattr(http_server, "KEEP_ALIVE_S", 2)
    server = await start_in_process(tokenizer, default_settings(http_port=0, served_model_name="base"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.app.ports.http)
    body = b'{"model": "base", "prompt": "Hello", "max_tokens": 2}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def one_response() -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await asyncio.wait_for(reader.readexactly(length), 10)
        return head

    try:
        writer.write(request)
        assert (await one_response()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.2)  # idle past 1 s, within the 2 s keep-alive
        writer.write(request)
        assert (await one_response()).startswith(b"HTTP/1.1 200")  # the same connection still serves
        await asyncio.sleep(2.5)  # idle past the keep-alive: the server closes it
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        await server.stop()
        await server.channel.close()
