"""The Admin service and the auth gate over real gRPC channels, on the catalog double (in-process)."""

from __future__ import annotations

import json

import grpc
import pytest

from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc, types_pb2
from tests.server.api.conftest import ADMIN_TOKEN, default_settings, start_in_process

pytestmark = pytest.mark.timeout(60)

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}).encode()
WEIGHTS = b"\x00" * 1500  # stands for a safetensors file; the catalog double does not parse it


def upload_messages(
    name: str, files: dict[str, bytes], chunk: int = 1024, overwrite: bool = False, header=True
):
    if header:
        yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name=name, overwrite=overwrite))
    for fname, data in files.items():
        for start in range(0, max(len(data), 1), chunk):
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(filename=fname, data=data[start : start + chunk])
            )


def adapter_files() -> dict[str, bytes]:
    return {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_upload_plain_and_chunked_then_list_get_delete(served):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    md = served.admin_md()
    plain = await admin.UploadAdapter(upload_messages("plain", adapter_files(), chunk=1024), metadata=md)
    assert plain.adapter.name == "plain" and plain.adapter.version == 1 and not plain.replaced
    assert plain.received_bytes == len(CONFIG) + len(WEIGHTS)
    chunked = await admin.UploadAdapter(upload_messages("chunked", adapter_files(), chunk=7), metadata=md)
    assert chunked.adapter.digest == plain.adapter.digest  # same bytes whatever the chunking
    files = {f.name: f for f in chunked.adapter.files}
    assert files["adapter_model.safetensors"].size_bytes == len(WEIGHTS)
    assert chunked.adapter.kind == types_pb2.ADAPTER_KIND_LORA and chunked.adapter.rank == 8

    listing = await admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=md)
    assert [a.name for a in listing.adapters] == ["chunked", "plain"] and listing.total_count == 2
    got = await admin.GetAdapter(admin_pb2.GetAdapterRequest(name="plain"), metadata=md)
    assert got.adapter.name == "plain" and got.adapter.created_at.seconds > 0

    # the stored adapter serves generation requests
    gen = generation_pb2_grpc.GenerationStub(served.channel)
    reply = await gen.Generate(generation_pb2.GenerateRequest(adapter="plain", prompt="hi"))
    assert reply.adapter == "plain" and reply.generated_tokens > 0

    deleted = await admin.DeleteAdapter(admin_pb2.DeleteAdapterRequest(name="plain"), metadata=md)
    assert deleted.adapter.name == "plain"
    err = await rpc_error(admin.GetAdapter(admin_pb2.GetAdapterRequest(name="plain"), metadata=md))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    err = await rpc_error(gen.Generate(generation_pb2.GenerateRequest(adapter="plain", prompt="hi")))
    assert err.code() is grpc.StatusCode.NOT_FOUND


async def test_upload_name_taken_and_overwrite(served):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    md = served.admin_md()
    await admin.UploadAdapter(upload_messages("a", adapter_files()), metadata=md)
    err = await rpc_error(admin.UploadAdapter(upload_messages("a", adapter_files()), metadata=md))
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    again = await admin.UploadAdapter(upload_messages("a", adapter_files(), overwrite=True), metadata=md)
    assert again.replaced and again.adapter.version == 2


@pytest.mark.parametrize(
    ("messages", "code", "text"),
    [
        (
            lambda: upload_messages("big", {"adapter_model.safetensors": b"x" * 5000}),
            "RESOURCE_EXHAUSTED",
            "max_upload_bytes",
        ),
        (
            lambda: upload_messages("fat", adapter_files(), chunk=2048),
            "RESOURCE_EXHAUSTED",
            "upload_chunk_bytes",
        ),
        (lambda: upload_messages("nohdr", adapter_files(), header=False), "INVALID_ARGUMENT", "header"),
        (lambda: upload_messages("dirs", {"../adapter_config.json": CONFIG}), "INVALID_ARGUMENT", "filename"),
        (
            lambda: upload_messages("noweights", {"adapter_config.json": CONFIG}),
            "INVALID_ARGUMENT",
            "adapter_model",
        ),
    ],
)
async def test_upload_refusals(served, messages, code, text):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    err = await rpc_error(admin.UploadAdapter(messages(), metadata=served.admin_md()))
    assert err.code() is getattr(grpc.StatusCode, code)
    assert text in err.details()
    listing = await admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=served.admin_md())
    assert listing.total_count == 0  # nothing stored


async def test_upload_interleaved_files_refused(served):
    admin = admin_pb2_grpc.AdminStub(served.channel)

    def messages():
        yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name="x"))
        for fname in ("adapter_config.json", "adapter_model.safetensors", "adapter_config.json"):
            yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=fname, data=b"{}"))

    err = await rpc_error(admin.UploadAdapter(messages(), metadata=served.admin_md()))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "already finished" in err.details()


async def test_list_pages(served):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    md = served.admin_md()
    names = ["a1", "a2", "a3", "b1", "b2"]
    for name in names:
        await admin.UploadAdapter(upload_messages(name, adapter_files()), metadata=md)
    seen, token, pages = [], "", 0
    while True:
        page = await admin.ListAdapters(
            admin_pb2.ListAdaptersRequest(page_size=2, page_token=token), metadata=md
        )
        assert page.total_count == 5
        seen += [a.name for a in page.adapters]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names and pages == 3
    prefixed = await admin.ListAdapters(admin_pb2.ListAdaptersRequest(name_prefix="b"), metadata=md)
    assert [a.name for a in prefixed.adapters] == ["b1", "b2"] and prefixed.total_count == 2
    err = await rpc_error(admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_token="***"), metadata=md))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()
    err = await rpc_error(admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=5000), metadata=md))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "page_size" in err.details()


async def test_pin_and_unpin(served):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    md = served.admin_md()
    await admin.UploadAdapter(upload_messages("p", adapter_files()), metadata=md)
    assert (await admin.PinAdapter(admin_pb2.PinAdapterRequest(name="p"), metadata=md)).adapter.pinned
    assert (await admin.GetAdapter(admin_pb2.GetAdapterRequest(name="p"), metadata=md)).adapter.pinned
    assert not (await admin.UnpinAdapter(admin_pb2.UnpinAdapterRequest(name="p"), metadata=md)).adapter.pinned
    err = await rpc_error(admin.PinAdapter(admin_pb2.PinAdapterRequest(name="zzz"), metadata=md))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_admin_auth_refusals(served, metadata, code):
    admin = admin_pb2_grpc.AdminStub(served.channel)
    err = await rpc_error(admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=metadata))
    assert err.code() is code
    err = await rpc_error(admin.UploadAdapter(upload_messages("x", adapter_files()), metadata=metadata))
    assert err.code() is code
    # generation needs no token on this server
    gen = generation_pb2_grpc.GenerationStub(served.channel)
    assert (await gen.Generate(generation_pb2.GenerateRequest(prompt="hi"))).generated_tokens > 0


async def test_no_admin_token_refuses_admin_unless_insecure(tiny_tokenizer):
    closed = await start_in_process(tiny_tokenizer, default_settings(admin_token=None))
    try:
        admin = admin_pb2_grpc.AdminStub(closed.channel)
        err = await rpc_error(admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=closed.admin_md()))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "ADAPTERSERVE_ADMIN_TOKEN" in err.details()
    finally:
        await closed.channel.close()
        assert await closed.stop() == 0
    open_ = await start_in_process(tiny_tokenizer, default_settings(admin_token=None, insecure_admin=True))
    try:
        admin = admin_pb2_grpc.AdminStub(open_.channel)
        assert (await admin.ListAdapters(admin_pb2.ListAdaptersRequest())).total_count == 0
    finally:
        await open_.channel.close()
        assert await open_.stop() == 0


async def test_generation_token(tiny_tokenizer):
    server = await start_in_process(tiny_tokenizer, default_settings(generate_token="gen-token"))
    try:
        gen = generation_pb2_grpc.GenerationStub(server.channel)
        request = generation_pb2.GenerateRequest(prompt="hi")
        assert (await rpc_error(gen.Generate(request))).code() is grpc.StatusCode.UNAUTHENTICATED
        err = await rpc_error(gen.Generate(request, metadata=(("authorization", "Bearer nope"),)))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        ok = await gen.Generate(request, metadata=(("authorization", "Bearer gen-token"),))
        assert ok.generated_tokens > 0
        # the admin token does not open generation, and vice versa
        err = await rpc_error(gen.Generate(request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        # refused calls are counted too (adapter unknown before the request is read: "other")
        metrics = server.app.metrics.registry

        def count(status: str) -> float:
            value = metrics.get_sample_value(
                "adapterserve_requests_total",
                {"protocol": "grpc", "method": "Generate", "adapter": "other", "status": status},
            )
            return value or 0.0

        assert count("UNAUTHENTICATED") == 1 and count("PERMISSION_DENIED") == 2
    finally:
        await server.channel.close()
        await server.stop()
