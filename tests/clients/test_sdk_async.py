"""AsyncClient against the real server subprocess: every method, `async for` streaming, errors."""

from __future__ import annotations

import asyncio

import pytest

import adapterserve
from adapterserve import AdapterKind, AsyncClient, FinishReason, RetryPolicy, UploadProgress
from tests.clients.conftest import ADMIN_TOKEN


@pytest.fixture
async def aclient(server):
    async with AsyncClient(
        server.target, admin_token=ADMIN_TOKEN, timeout=30, retry=RetryPolicy(max_attempts=3)
    ) as c:
        yield c


async def test_health_info_generate(aclient):
    assert (await aclient.health()).serving
    assert (await aclient.server_info()).model_type == "llama"
    r = await aclient.generate("The capital of France is", max_new_tokens=8, ignore_eos=True)
    assert r.generated_tokens == len(r.token_ids) == 8 and r.finish_reason is FinishReason.LENGTH
    chat = await aclient.generate([{"role": "user", "content": "hi"}], max_new_tokens=3, ignore_eos=True)
    assert chat.generated_tokens == 3


async def test_async_stream_order_and_completeness(aclient):
    full = await aclient.generate("Classify the sentiment", max_new_tokens=10, ignore_eos=True)
    chunks = [c async for c in aclient.stream("Classify the sentiment", max_new_tokens=10, ignore_eos=True)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].generated_tokens == 10


async def test_concurrent_streams_from_one_client(aclient):
    prompts = ["a b c", "hello world", "def add(a, b)", "yes no maybe"]
    expected = [(await aclient.generate(p, max_new_tokens=6, ignore_eos=True)).token_ids for p in prompts]

    async def collect(p: str) -> list[int]:
        return [t async for c in aclient.stream(p, max_new_tokens=6, ignore_eos=True) for t in c.token_ids]

    assert await asyncio.gather(*(collect(p) for p in prompts)) == expected


async def test_early_aclose_cancels(aclient):
    stream = aclient.stream("Once upon a time", max_new_tokens=48, ignore_eos=True)
    first = await anext(stream)
    assert first.index == 0
    await stream.aclose()
    assert (await aclient.generate("x", max_new_tokens=1)).generated_tokens == 1


async def test_async_adapter_lifecycle(aclient, lora_dir, name):
    seen: list[UploadProgress] = []
    up = await aclient.upload_adapter(lora_dir, name, progress=seen.append, chunk_bytes=2048)
    assert up.adapter.kind is AdapterKind.LORA and seen[-1].sent_bytes == up.received_bytes
    assert len(seen) > 2
    assert name in [a.name for a in await aclient.list_adapters(page_size=1)]
    assert (await aclient.get_adapter(name)).rank == 4
    assert (await aclient.pin(name)).pinned
    assert not (await aclient.unpin(name)).pinned
    r = await aclient.generate("hello", adapter=name, max_new_tokens=3)
    assert r.adapter == name
    assert (await aclient.delete_adapter(name)).name == name
    with pytest.raises(adapterserve.NotFound):
        await aclient.get_adapter(name)


async def test_async_errors(aclient, server, lora_dir, name):
    with pytest.raises(adapterserve.NotFound):
        await aclient.generate("hi", adapter="no-such-adapter")
    with pytest.raises(adapterserve.NotFound):
        async for _ in aclient.stream("hi", adapter="no-such-adapter"):
            pass
    with pytest.raises(adapterserve.InvalidArgument):
        await aclient.generate("hi", top_p=0.0)
    await aclient.upload_adapter(lora_dir, name)
    with pytest.raises(adapterserve.AlreadyExists):
        await aclient.upload_adapter(lora_dir, name)
    await aclient.delete_adapter(name)
    with pytest.raises(adapterserve.DeadlineExceeded):
        await aclient.generate("hi", max_new_tokens=48, ignore_eos=True, timeout=0.001)
    async with AsyncClient(server.target) as anonymous:
        with pytest.raises(adapterserve.Unauthenticated):
            await anonymous.list_adapters()
    async with AsyncClient(server.target, admin_token="wrong") as wrong:
        with pytest.raises(adapterserve.PermissionDenied):
            await wrong.pin("anything")
    async with AsyncClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=1), timeout=5) as nowhere:
        with pytest.raises(adapterserve.Unavailable):
            await nowhere.health()
