"""A generate crosses one GenerationSession whatever the transport (in-process, engine double): gRPC's
Generate and GenerateStream and HTTP's completions (unary and streamed) and chat each open exactly one
session, the engine gets the same request for the same input, and the metrics count what clients saw."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from adapterserve.server.api.session import Sessions
from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.tiny_model import build_tiny_tokenizer
from tests.server.api.conftest import default_settings, start_in_process

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def total(families: str, name: str, **labels: str) -> float:
    found = 0.0
    for line in families.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            found += float(line.rsplit(" ", 1)[1])
    return found


async def test_both_transports_cross_one_session_per_call(tokenizer, monkeypatch):
    opened: list[tuple[str, str]] = []
    open_session = Sessions.open

    def spy(self, method, adapter, **kw):
        session = open_session(self, method, adapter, **kw)
        opened.append((session.protocol, method))
        return session

    monkeypatch.setattr(Sessions, "open", spy)
    server = await start_in_process(tokenizer, default_settings(http_port=0, served_model_name="base"))
    url = f"http://127.0.0.1:{server.app.ports.http}/v1"
    stub = generation_pb2_grpc.GenerationStub(server.channel)
    sampling = generation_pb2.SamplingParams(max_new_tokens=4, temperature=0.5)
    grpc_request = generation_pb2.GenerateRequest(prompt="Hello there", sampling=sampling)
    body = {"model": "base", "prompt": "Hello there", "max_tokens": 4, "temperature": 0.5}
    try:
        reply = await stub.Generate(grpc_request)
        chunks = [c async for c in stub.GenerateStream(grpc_request)]
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            unary = (await client.post("/completions", json=body)).json()
            async with client.stream("POST", "/completions", json={**body, "stream": True}) as response:
                frames = [line async for line in response.aiter_lines() if line]
            chat = (
                await client.post(
                    "/chat/completions",
                    json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                )
            ).json()
            async with httpx.AsyncClient(base_url=server.metrics_url.removesuffix("/metrics")) as scrape:
                metrics = (await scrape.get("/metrics")).text
    finally:
        await server.channel.close()
        await server.stop()
    assert opened == [
        ("grpc", "Generate"),
        ("grpc", "GenerateStream"),
        ("http", "completions"),
        ("http", "completions"),
        ("http", "chat.completions"),
    ]
    submitted = [dataclasses.replace(r, request_id="") for r in server.engine.submitted]
    assert submitted[0] == submitted[1] == submitted[2] == submitted[3]  # the same input, one request
    assert reply.text == "".join(c.text for c in chunks) == unary["choices"][0]["text"]
    assert frames[-1] == "data: [DONE]"
    seen = {"grpc": reply.generated_tokens + chunks[-1].generated_tokens}
    seen["http"] = unary["usage"]["completion_tokens"] + 4 + chat["usage"]["completion_tokens"]
    for protocol, calls in (("grpc", 2), ("http", 3)):
        assert total(metrics, "adapterserve_requests_total", protocol=protocol, status="OK") == calls
    generated = total(metrics, "adapterserve_generated_tokens_total", adapter="base")
    assert generated == seen["grpc"] + seen["http"] == 4 + 4 + 4 + 4 + 3
    assert total(metrics, "adapterserve_time_to_first_token_seconds_count", adapter="base") == 5
