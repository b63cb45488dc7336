"""End to end: the real `adapterserve serve` (tiny model, real engine and store) in a subprocess, real gRPC.

One server is shared by the tests of this module (starting one costs ~15 s on a small machine); the
health/drain test starts its own. Adapters are real PEFT adapters of every kind saved by PEFT itself.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc, types_pb2
from tests.helpers.server_process import LISTENING, READY, ServerProcess, start_server

pytestmark = pytest.mark.timeout(300)

TOKEN = "e2e-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
KINDS = {
    "e2e-lora": ("LORA", types_pb2.ADAPTER_KIND_LORA),
    "e2e-ia3": ("IA3", types_pb2.ADAPTER_KIND_IA3),
    "e2e-prompt": ("PROMPT_TUNING", types_pb2.ADAPTER_KIND_PROMPT),
    "e2e-ptuning": ("P_TUNING", types_pb2.ADAPTER_KIND_PROMPT),
    "e2e-prefix": ("PREFIX_TUNING", types_pb2.ADAPTER_KIND_PREFIX),
}
MAX_UPLOAD = 400_000
SERVER_FLAGS = (
    "--max-batch-size",
    "8",
    "--max-queue",
    "16",  # the 12-client burst below must fit; the 40-request flood must not
    "--max-upload-bytes",
    str(MAX_UPLOAD),
    "--upload-chunk-bytes",
    "65536",
    "--max-new-tokens",
    "250",
    "--max-prompt-tokens",
    "200",
    "--grace",
    "20",
)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.helpers.peft_adapters import save_peft_adapter

    root = tmp_path_factory.mktemp("e2e-adapters")
    return {
        name: save_peft_adapter(tiny_model_dir, root / name, peft_type, seed=i)
        for i, (name, (peft_type, _)) in enumerate(KINDS.items())
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-server")
    proc = start_server(
        tiny_model_dir, root / "store", extra_args=SERVER_FLAGS, env={"ADAPTERSERVE_ADMIN_TOKEN": TOKEN}
    )
    yield proc
    assert proc.stop() == 0, proc.log_text()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def uploaded(channel, adapter_dirs) -> dict[str, admin_pb2.UploadAdapterResponse]:
    """Every kind uploaded: the first with 64 KiB chunks, the others with small chunks of varied size."""
    admin = admin_pb2_grpc.AdminStub(channel)
    replies = {}
    for i, (name, path) in enumerate(adapter_dirs.items()):
        chunk = 65536 if i == 0 else 997 * (i + 1)
        replies[name] = admin.UploadAdapter(upload_messages(name, path, chunk), metadata=AUTH)
    return replies


def upload_messages(name: str, path: Path, chunk: int, overwrite: bool = False, files=None):
    yield admin_pb2.UploadAdapterRequest(
        header=admin_pb2.UploadHeader(name=name, overwrite=overwrite, description="e2e")
    )
    for fname in files or ("adapter_config.json", "adapter_model.safetensors"):
        data = (path / fname).read_bytes()
        for start in range(0, len(data), chunk):
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(filename=fname, data=data[start : start + chunk])
            )


def gen_request(adapter: str = "", n: int = 8, prompt: str = "The capital of France is", **sampling):
    return generation_pb2.GenerateRequest(
        adapter=adapter, prompt=prompt, sampling=generation_pb2.SamplingParams(max_new_tokens=n, **sampling)
    )


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return info.value


def scrape(server: ServerProcess) -> dict[str, list]:
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def metric(families, sample: str, **labels) -> float:
    for family in families.values():
        for s in family:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {sample} {labels}")


def wait_running_zero(server: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(scrape(server), "adapterserve_running_requests") != 0:
        assert time.monotonic() < deadline, "the engine row was not freed"
        time.sleep(0.05)


def test_upload_and_list_every_kind(channel, uploaded, adapter_dirs):
    admin = admin_pb2_grpc.AdminStub(channel)
    listing = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=2), metadata=AUTH)
    names = [a.name for a in listing.adapters]
    while listing.next_page_token:
        listing = admin.ListAdapters(
            admin_pb2.ListAdaptersRequest(page_size=2, page_token=listing.next_page_token), metadata=AUTH
        )
        names += [a.name for a in listing.adapters]
    assert names == sorted(KINDS)
    for name, (peft_type, kind) in KINDS.items():
        info = uploaded[name].adapter
        assert info.kind == kind and info.peft_type == peft_type and info.version == 1
        sizes = {f.name: f.size_bytes for f in info.files}
        assert (
            sizes["adapter_model.safetensors"]
            == (adapter_dirs[name] / "adapter_model.safetensors").stat().st_size
        )
        assert uploaded[name].received_bytes == info.size_bytes
        got = admin.GetAdapter(admin_pb2.GetAdapterRequest(name=name), metadata=AUTH).adapter
        assert got.digest == info.digest and got.description == "e2e"
    assert uploaded["e2e-lora"].adapter.rank == 4
    assert uploaded["e2e-prefix"].adapter.num_virtual_tokens == 4


def test_generate_every_kind_from_concurrent_clients(server, channel, uploaded):
    gen = generation_pb2_grpc.GenerationStub(channel)
    adapters = ["", *KINDS]
    reference = {a: gen.Generate(gen_request(a)) for a in adapters}  # one at a time
    assert all(r.generated_tokens > 0 for r in reference.values())
    assert len({tuple(r.token_ids) for r in reference.values()}) > 1  # adapters change the output

    def unary(adapter: str) -> tuple[tuple[int, ...], str]:
        with grpc.insecure_channel(server.target) as ch:
            reply = generation_pb2_grpc.GenerationStub(ch).Generate(gen_request(adapter))
        return tuple(reply.token_ids), reply.text

    def stream(adapter: str) -> tuple[tuple[int, ...], str]:
        with grpc.insecure_channel(server.target) as ch:
            chunks = list(generation_pb2_grpc.GenerationStub(ch).GenerateStream(gen_request(adapter)))
        assert chunks[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
        assert all(c.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        ids = tuple(t for c in chunks for t in c.token_ids)
        assert chunks[-1].generated_tokens == len(ids)
        return ids, "".join(c.text for c in chunks)

    jobs = [(fn, a) for a in adapters for fn in (unary, stream)]  # 12 concurrent clients, every kind at once
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: (job[1], job[0](job[1])), jobs))
    for adapter, (ids, text) in results:
        assert ids == tuple(reference[adapter].token_ids), adapter
        assert text == reference[adapter].text, adapter


def test_chat_request(channel):
    gen = generation_pb2_grpc.GenerationStub(channel)
    chat = generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role="user", content="hello world")]
    )
    reply = gen.Generate(
        generation_pb2.GenerateRequest(
            messages=chat, sampling=generation_pb2.SamplingParams(max_new_tokens=3)
        )
    )
    assert reply.prompt_tokens > 3 and reply.generated_tokens >= 1


def test_status_codes(channel, uploaded, adapter_dirs, tmp_path):
    gen = generation_pb2_grpc.GenerationStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    err = rpc_error(gen.Generate, gen_request(n=251))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in err.details()
    err = rpc_error(gen.Generate, gen_request(prompt="hello world " * 150))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in err.details()
    err = rpc_error(gen.Generate, gen_request("no-such-adapter"))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    err = rpc_error(
        admin.UploadAdapter, upload_messages("e2e-lora", adapter_dirs["e2e-lora"], 4096), metadata=AUTH
    )
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((adapter_dirs["e2e-lora"] / "adapter_config.json").read_bytes())
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_UPLOAD + 1))
    err = rpc_error(admin.UploadAdapter, upload_messages("too-big", big, 65536), metadata=AUTH)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_upload_bytes" in err.details()
    err = rpc_error(admin.UploadAdapter, upload_messages("fat-chunk", big, 65537), metadata=AUTH)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "upload_chunk_bytes" in err.details()
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    err = rpc_error(
        admin.UploadAdapter,
        upload_messages("pickled", pickle_dir, 1024, files=["adapter_model.bin"]),
        metadata=AUTH,
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "pickle" in err.details()
    names = [a.name for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=AUTH).adapters]
    assert not {"too-big", "pickled", "fat-chunk"} & set(names)  # refused uploads leave nothing behind


def test_queue_full_is_resource_exhausted(server, channel):
    flood = [gen_request(n=200, ignore_eos=True) for _ in range(40)]

    def call(request):
        with grpc.insecure_channel(server.target) as ch:
            try:
                generation_pb2_grpc.GenerationStub(ch).Generate(request)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

    with concurrent.futures.ThreadPoolExecutor(len(flood)) as pool:
        codes = list(pool.map(call, flood))
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    wait_running_zero(server)


def test_auth_refusals(channel):
    admin = admin_pb2_grpc.AdminStub(channel)
    err = rpc_error(admin.ListAdapters, admin_pb2.ListAdaptersRequest())
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(
        admin.ListAdapters, admin_pb2.ListAdaptersRequest(), metadata=(("authorization", "Bearer nope"),)
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    err = rpc_error(admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name="e2e-lora"))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED


def test_cancel_and_deadline_free_the_engine_row(server, channel):
    gen = generation_pb2_grpc.GenerationStub(channel)
    call = gen.GenerateStream(gen_request("e2e-lora", n=250, ignore_eos=True))
    first = next(call)
    assert first.token_ids
    assert metric(scrape(server), "adapterserve_running_requests") >= 1
    call.cancel()
    wait_running_zero(server)
    err = rpc_error(gen.Generate, gen_request("e2e-prefix", n=250, ignore_eos=True), timeout=0.05)
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_running_zero(server)
    assert gen.Generate(gen_request(n=2)).generated_tokens == 2  # and the server serves on


def test_pin_unpin_delete(channel, uploaded):
    admin = admin_pb2_grpc.AdminStub(channel)
    gen = generation_pb2_grpc.GenerationStub(channel)
    pinned = admin.PinAdapter(admin_pb2.PinAdapterRequest(name="e2e-ia3"), metadata=AUTH).adapter
    assert pinned.pinned and pinned.cache_tier == types_pb2.CACHE_TIER_DEVICE  # loaded into a device slot
    assert not admin.UnpinAdapter(admin_pb2.UnpinAdapterRequest(name="e2e-ia3"), metadata=AUTH).adapter.pinned
    deleted = admin.DeleteAdapter(admin_pb2.DeleteAdapterRequest(name="e2e-ptuning"), metadata=AUTH)
    assert deleted.adapter.name == "e2e-ptuning"
    err = rpc_error(gen.Generate, gen_request("e2e-ptuning"))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    err = rpc_error(admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name="e2e-ptuning"), metadata=AUTH)
    assert err.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"adapterserve.v1.Generation", "adapterserve.v1.Admin", "grpc.health.v1.Health"} <= names
    # and a service's descriptor can be fetched (what grpcurl describe does)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="adapterserve.v1.Generation")])
    )
    protos = [p for r in replies for p in r.file_descriptor_response.file_descriptor_proto]
    assert protos


def test_metrics_endpoint(server, channel, uploaded):
    gen = generation_pb2_grpc.GenerationStub(channel)
    gen.Generate(gen_request("e2e-lora", n=3))
    families = scrape(server)
    assert metric(families, "adapterserve_requests_total", adapter="e2e-lora", status="OK") >= 1
    assert metric(families, "adapterserve_requests_total", adapter="base", status="OK") >= 1
    assert metric(families, "adapterserve_requests_total", adapter="other", status="NOT_FOUND") >= 1
    assert metric(families, "adapterserve_generated_tokens_total", adapter="e2e-lora") >= 3
    assert metric(families, "adapterserve_time_to_first_token_seconds_count", adapter="e2e-lora") >= 1
    assert metric(families, "adapterserve_time_per_output_token_seconds_count", adapter="e2e-lora") >= 1
    # how long requests waited for their prefill to start: a long wait shows here, not only in the TTFT
    waits = metric(families, "adapterserve_queue_wait_seconds_count", adapter="e2e-lora")
    assert waits >= 1
    assert 0 <= metric(families, "adapterserve_queue_wait_seconds_sum", adapter="e2e-lora") < 60 * waits
    assert metric(families, "adapterserve_uploads_total", status="OK") == len(KINDS)
    assert metric(families, "adapterserve_uploads_total", status="ALREADY_EXISTS") >= 1
    # An upload puts the adapter it validated into host memory: its first request is a host hit.
    assert metric(families, "adapterserve_adapter_cache_hits_total", tier="host") >= 1
    assert metric(families, "adapterserve_adapter_cache_hits_total", tier="device") >= 1
    assert metric(families, "adapterserve_adapter_cache_bytes", tier="disk") > 0
    assert metric(families, "adapterserve_queue_depth") == 0
    assert metric(families, "adapterserve_adapter_slots") >= 1
    # which decode step serves, and that it has not fallen back (on a GPU: graphs, replays counted)
    assert metric(families, "adapterserve_decode_step_info", mode="eager") == 1
    assert metric(families, "adapterserve_decode_fallback") == 0
    assert metric(families, "adapterserve_decode_graph_replays_total") == 0


def test_health_transitions_and_sigterm_drain(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=("--grace", "30"), wait_ready=False)
    try:
        with grpc.insecure_channel(server.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            statuses = [next(watch).status]
            assert statuses[0] == health_pb2.HealthCheckResponse.NOT_SERVING  # listening, model not warm yet
            statuses.append(next(watch).status)
            assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
            server.wait_for(READY, 60)
            # no admin token configured and no --insecure-admin: admin refused
            err = rpc_error(admin_pb2_grpc.AdminStub(ch).ListAdapters, admin_pb2.ListAdaptersRequest())
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
            gen = generation_pb2_grpc.GenerationStub(ch)
            running = gen.GenerateStream(gen_request(n=150, ignore_eos=True))
            first = next(running)
            server.signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            err = rpc_error(gen.Generate, gen_request(n=2))
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            rest = list(running)  # the running generation finishes within the grace period
            assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
        assert server.wait(60) == 0
        assert "draining" in server.log_text()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert LISTENING.search(server.log_text())
