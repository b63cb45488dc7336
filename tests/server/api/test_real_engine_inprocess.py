"""The real runtime (tiny base, real engine and store) inside the test process, where faults can be injected."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import ServerSettings
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc, types_pb2
from tests.server.api.conftest import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def real_app(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        insecure_admin=True,
        demo_adapters=True,
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    assert not task.done(), task.exception()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}")
    yield app, channel
    await channel.close()
    app.request_stop()
    assert await asyncio.wait_for(task, 60) == 0


def request(adapter: str = "", n: int = 4) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        adapter=adapter,
        prompt="The capital of France is",
        sampling=generation_pb2.SamplingParams(max_new_tokens=n),
    )


async def test_device_out_of_memory_fails_one_request_and_the_server_keeps_serving(real_app):
    import torch

    app, channel = real_app
    engine = app.runtime.get().engine
    runner = engine.core.runner
    real_prefill = runner.prefill
    calls = {"n": 0}

    def failing_prefill(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(*args, **kwargs)

    runner.prefill = failing_prefill
    gen = generation_pb2_grpc.GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gen.Generate(request())
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in info.value.details()
    reply = await gen.Generate(request())
    assert reply.generated_tokens == 4
    assert engine.stats().running == 0


async def test_demo_adapters_of_every_kind_are_served(real_app):
    app, channel = real_app
    admin = admin_pb2_grpc.AdminStub(channel)
    listing = await admin.ListAdapters(admin_pb2.ListAdaptersRequest())
    kinds = {a.name: a.kind for a in listing.adapters}
    assert kinds == {
        "demo-ia3": types_pb2.ADAPTER_KIND_IA3,
        "demo-lora": types_pb2.ADAPTER_KIND_LORA,
        "demo-prefix": types_pb2.ADAPTER_KIND_PREFIX,
        "demo-prompt": types_pb2.ADAPTER_KIND_PROMPT,
    }
    gen = generation_pb2_grpc.GenerationStub(channel)
    base = await gen.Generate(request(n=8))
    outputs = {name: tuple((await gen.Generate(request(name, n=8))).token_ids) for name in kinds}
    assert all(len(ids) == 8 for ids in outputs.values())
    assert any(ids != tuple(base.token_ids) for ids in outputs.values())
    info = await gen.GetServerInfo(generation_pb2.GetServerInfoRequest())
    assert info.model_type == "llama" and info.quantize == "none" and info.chat_template
    assert info.limits.max_new_tokens == 256 and info.base_fingerprint.startswith("sha256:")
