"""A server started with only --adapter-source s3://... (nothing uploaded) serves adapters of every kind
it never saw, over gRPC and the OpenAI HTTP API, with greedy text equal to the same adapters uploaded.
The S3-compatible server is real (rclone serve s3 on 127.0.0.1); so are the engine and the store."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import ServerSettings, SourceSettings
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.helpers.object_store import S3Server
from tests.helpers.peft_adapters import PEFT_TYPES
from tests.server.api.conftest import wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = "The capital of France is"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
async def served(tiny_model_dir, peft_adapter_dirs, tmp_path, monkeypatch):
    with S3Server(tmp_path / "s3") as s3:
        for peft_type, src in peft_adapter_dirs.items():
            s3.put_dir(f"team/adapters/{peft_type.lower()}", src)
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        settings = ServerSettings(
            base_model=str(tiny_model_dir),
            quantize="none",
            device="cpu",
            store=tmp_path / "store",
            port=0,
            metrics_port=0,
            http_port=0,
            insecure_admin=True,
            sources=SourceSettings(uris=("s3://team/adapters",), fetch_timeout_s=5.0),
        )
        app = ServeApp(settings)
        task = asyncio.create_task(app.run(handle_signals=False))
        await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
        assert not task.done(), task.exception()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}")
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.ports.http}/v1", timeout=60)
        try:
            yield app, channel, http, s3
        finally:
            await http.aclose()
            await channel.close()
            app.request_stop()
            assert await asyncio.wait_for(task, 60) == 0


def request(adapter: str) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        adapter=adapter, prompt=PROMPT, sampling=generation_pb2.SamplingParams(max_new_tokens=8)
    )


def upload_messages(name: str, src):
    yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name=name))
    for fname in FILES:
        yield admin_pb2.UploadAdapterRequest(
            chunk=admin_pb2.FileChunk(filename=fname, data=(src / fname).read_bytes())
        )


async def test_every_kind_fetched_on_first_use_equals_the_same_adapter_uploaded(served, peft_adapter_dirs):
    app, channel, http, _ = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    assert (await admin.ListAdapters(admin_pb2.ListAdaptersRequest())).adapters == []
    for peft_type in PEFT_TYPES:
        name = peft_type.lower()
        fetched = await gen.Generate(request(name))  # gRPC: fetched now
        await admin.UploadAdapter(upload_messages(f"up-{name}", peft_adapter_dirs[peft_type]))
        uploaded = await gen.Generate(request(f"up-{name}"))
        assert fetched.token_ids == uploaded.token_ids, peft_type
        body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        over_http = (await http.post("/completions", json=body)).json()
        assert over_http["choices"][0]["text"] == uploaded.text, peft_type
    listing = {a.name: a for a in (await admin.ListAdapters(admin_pb2.ListAdaptersRequest())).adapters}
    assert set(listing) == {t.lower() for t in PEFT_TYPES} | {f"up-{t.lower()}" for t in PEFT_TYPES}
    assert listing["lora"].origin.source == "s3://team/adapters"
    assert listing["lora"].origin.etag and listing["lora"].origin.fetched_at.seconds > 0
    assert not listing["up-lora"].HasField("origin")
    models = {m["id"]: m for m in (await http.get("/models")).json()["data"]}
    assert models["ia3"]["origin"]["source"] == "s3://team/adapters"
    assert models["up-ia3"].get("origin") is None


async def test_32_concurrent_first_requests_over_http_and_grpc_download_once(served):
    app, channel, http, s3 = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    replies = await asyncio.gather(
        *(gen.Generate(request("lora")) for _ in range(16)),
        *(http.post("/completions", json=body) for _ in range(16)),
    )
    grpc_texts = {r.text for r in replies[:16]}
    http_texts = {r.json()["choices"][0]["text"] for r in replies[16:]}
    assert len(grpc_texts) == 1 and len(http_texts) == 1
    time.sleep(0.5)  # rclone's log is written asynchronously
    assert s3.object_gets("team/adapters/lora/adapter_model.safetensors") == 1


async def test_hostile_names_are_400_and_missing_names_404_naming_the_source(served):
    app, channel, http, s3 = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    for name in ("../lora", "a/b", "a%2Fb", "x?y=1"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gen.Generate(request(name))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        reply = await http.post("/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert reply.status_code == 400, name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gen.Generate(request("no-such-task"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "s3://team/adapters" in caught.value.details()
    reply = await http.post("/completions", json={"model": "no-such-task", "prompt": PROMPT, "max_tokens": 2})
    assert reply.status_code == 404 and "s3://team/adapters" in reply.json()["error"]["message"]


async def test_store_stopped_mid_run_is_503_then_recovers(served):
    app, channel, http, s3 = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    await gen.Generate(request("lora"))
    s3.stop()
    try:
        assert (await gen.Generate(request("lora"))).generated_tokens > 0  # stored: no source needed
        started = time.monotonic()
        reply = await http.post("/completions", json={"model": "ia3", "prompt": PROMPT, "max_tokens": 2})
        assert reply.status_code == 503
        assert time.monotonic() - started < 6.0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gen.Generate(request("ia3"))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        s3.start()
    assert (await gen.Generate(request("ia3"))).generated_tokens > 0


async def test_refresh_over_grpc_sdk_cli_and_http_swaps_in_a_new_version(served, peft_adapter_dirs):
    import io

    from adapterserve import Client
    from adapterserve.cli import main as cli_main

    app, channel, http, s3 = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    before = await gen.Generate(request("lora"))
    first = await admin.GetAdapter(admin_pb2.GetAdapterRequest(name="lora"))
    unchanged = await admin.RefreshAdapter(admin_pb2.RefreshAdapterRequest(name="lora"))
    assert not unchanged.changed and unchanged.adapter.version == first.adapter.version

    # another adapter's files under the same name: a new ETag in the bucket
    s3.put_dir("team/adapters/lora", peft_adapter_dirs["IA3"])
    target = f"127.0.0.1:{app.ports.grpc}"
    with Client(target) as client:
        result = await asyncio.to_thread(client.refresh_adapter, "lora")
    assert result.changed and result.adapter.version > first.adapter.version
    assert result.adapter.origin is not None and result.adapter.origin.source == "s3://team/adapters"
    after = await gen.Generate(request("lora"))
    assert after.token_ids != before.token_ids  # the new version is served whole

    out = io.StringIO()
    code = await asyncio.to_thread(cli_main, ["adapters", "refresh", "lora", "--target", target], out=out)
    assert code == 0 and "unchanged" in out.getvalue()
    reply = await http.post("/adapters/lora/refresh")
    assert reply.status_code == 200 and reply.json()["changed"] is False
    assert reply.json()["origin"]["source"] == "s3://team/adapters"

    await admin.UploadAdapter(upload_messages("uploaded", peft_adapter_dirs["LORA"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.RefreshAdapter(admin_pb2.RefreshAdapterRequest(name="uploaded"))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (await http.post("/adapters/no-such/refresh")).status_code == 404


async def test_fetch_metrics_are_exported(served):
    app, channel, http, s3 = served
    gen = generation_pb2_grpc.GenerationStub(channel)
    scored = await gen.Score(  # Score fetches on first use as Generate does
        generation_pb2.ScoreRequest(adapter="prompt_tuning", prompt=PROMPT, continuation=" Paris")
    )
    assert scored.adapter == "prompt_tuning"
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await gen.Generate(request("missing-one"))
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{app.ports.metrics}/metrics")).text
    assert 'adapterserve_adapter_fetches_total{outcome="fetched",source="s3://team/adapters"} 1.0' in text
    assert 'adapterserve_adapter_fetches_total{outcome="not_found",source="*"} 1.0' in text
    assert "adapterserve_adapter_fetch_negative_cache_hits_total 2.0" in text
    assert "adapterserve_adapter_fetch_seconds_count 1.0" in text
    assert 'adapterserve_adapter_fetch_bytes_bucket{le="+Inf"} 1.0' in text
    assert "adapterserve_adapter_fetched_disk_bytes" in text
