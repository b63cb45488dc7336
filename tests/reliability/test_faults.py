"""Faults against the real server: disconnects, adapter churn under running streams, a simulated
out-of-memory error, SIGTERM and a second signal with streams in flight, kill -9 and restart."""

from __future__ import annotations

import signal

import grpc
import pytest

from adapterserve import Client
from adapterserve.errors import NotFound, ResourceExhausted
from adapterserve.retry import RetryPolicy
from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.server_process import start_server
from tests.reliability.conftest import (
    ADMIN_TOKEN,
    PEFT_KINDS,
    StreamCall,
    metric_sum,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

NO_RETRY = RetryPolicy(max_attempts=1)
DRAINING = "server is shutting down; retry on another replica or later"
LONG = 1500  # tokens: a stream that runs for seconds on the tiny model
LONG_FLAGS = (
    "--max-new-tokens",
    str(LONG),
    "--max-seq-len",
    str(LONG + 100),
    "--max-prompt-tokens",
    "64",
    "--max-batch-size",
    "8",
)


def admin(target: str) -> Client:
    return Client(target, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=60)


def engine_load(server) -> tuple[float, float, float]:
    """(running rows, waiting requests, adapter slots held by requests)."""
    m = scrape(server)
    return (
        metric_sum(m, "adapterserve_running_requests"),
        metric_sum(m, "adapterserve_queue_depth"),
        metric_sum(m, "adapterserve_adapter_slots_in_use"),
    )


def engine_free(server) -> bool:
    return engine_load(server) == (0, 0, 0)


@pytest.fixture(scope="module")
def long_server(tiny_model_dir, tmp_path_factory, kind_dirs):
    """A server whose generations may run for seconds, with the OOM test hook on."""
    root = tmp_path_factory.mktemp("faults")
    server = start_server(
        tiny_model_dir,
        root / "store",
        extra_args=(*LONG_FLAGS, "--grace", "20"),
        env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "ADAPTERSERVE_FAULT_INJECTION": "1"},
    )
    with admin(server.target) as client:
        for kind in PEFT_KINDS:
            client.upload_adapter(kind_dirs[kind], f"f-{kind.lower().replace('_', '-')}")
    yield server
    assert server.stop() == 0, server.log_text()


def test_a_client_that_disconnects_frees_its_row_and_slot(long_server):
    calls = [
        StreamCall(long_server.target, adapter=a, max_new_tokens=LONG)
        for a in ("f-lora", "f-prefix-tuning", "")
    ]
    for call in calls:
        assert call.first.wait(30)
    m = scrape(long_server)
    assert metric_sum(m, "adapterserve_running_requests") == 3
    assert metric_sum(m, "adapterserve_adapter_slots_in_use") == 2
    for call in calls:
        call.cancel()
    for call in calls:
        assert call.join().code == "CANCELLED"
        assert call.finish_reason == 0  # cut short: no finish
    wait_until(lambda: engine_free(long_server), timeout=5)


def test_delete_and_replace_while_streams_use_the_adapter(long_server, kind_dirs):
    with admin(long_server.target) as client:
        client.upload_adapter(kind_dirs["LORA"], "churn-del")
        client.upload_adapter(kind_dirs["LORA"], "churn-rep")
        n = 300
        on_deleted = [StreamCall(long_server.target, adapter="churn-del", max_new_tokens=n) for _ in range(2)]
        on_replaced = [
            StreamCall(long_server.target, adapter="churn-rep", max_new_tokens=n) for _ in range(2)
        ]
        for call in on_deleted + on_replaced:
            assert call.first.wait(30)
        client.delete_adapter("churn-del")
        replaced = client.upload_adapter(kind_dirs["IA3"], "churn-rep", overwrite=True)
        assert replaced.replaced and replaced.adapter.version == 2
        # Streams that started on the old version finish on it, in full.
        for call in on_deleted + on_replaced:
            call.join()
            assert (call.code, call.tokens, call.finish_reason) == (
                "OK",
                n,
                generation_pb2.FINISH_REASON_LENGTH,
            )
        with pytest.raises(NotFound):
            client.generate("hello", adapter="churn-del", max_new_tokens=2)
        after = client.generate("hello", adapter="churn-rep", max_new_tokens=2)
        assert after.generated_tokens == 2
        assert client.get_adapter("churn-rep").kind.value == "ia3"
        client.delete_adapter("churn-rep")
    wait_until(lambda: engine_free(long_server), timeout=10)


def test_a_simulated_out_of_memory_fails_only_that_request(long_server):
    others = [StreamCall(long_server.target, adapter=a, max_new_tokens=400) for a in ("f-lora", "f-ia3", "")]
    for call in others:
        assert call.first.wait(30)  # all three are decoding: the marked request is prefilled alone
    with Client(long_server.target, retry=NO_RETRY, timeout=60) as client:
        with pytest.raises(ResourceExhausted) as info:
            client.generate("hello", adapter="f-lora", max_new_tokens=5, request_id="fault-oom-1")
        assert "out of memory" in info.value.message
        for call in others:
            call.join()
            assert (call.code, call.tokens) == ("OK", 400)
        assert client.generate("hello", adapter="f-lora", max_new_tokens=3).generated_tokens == 3
    assert "out of memory" in long_server.log_text()
    try:
        wait_until(lambda: engine_free(long_server), timeout=10)
    except AssertionError:
        raise AssertionError(
            f"engine still holds (rows, waiting, slots) = {engine_load(long_server)}"
        ) from None


def generate_now(target: str) -> tuple[str, str]:
    with grpc.insecure_channel(target) as channel:
        try:
            generation_pb2_grpc.GenerationStub(channel).Generate(
                generation_pb2.GenerateRequest(
                    prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=2)
                ),
                timeout=10,
            )
        except grpc.RpcError as err:
            return err.code().name, err.details() or ""
    return "OK", ""


def test_sigterm_lets_streams_finish_and_refuses_new_calls(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=(*LONG_FLAGS, "--grace", "60"))
    n = 600
    calls = [StreamCall(server.target, max_new_tokens=n, read_delay=0.002) for _ in range(4)]
    for call in calls:
        assert call.first.wait(30)
    server.signal(signal.SIGTERM)
    server.wait_for(__import__("re").compile("draining: "), 30)
    assert generate_now(server.target) == ("UNAVAILABLE", DRAINING)
    for call in calls:
        call.join(90)
        assert (call.code, call.tokens, call.finish_reason) == ("OK", n, generation_pb2.FINISH_REASON_LENGTH)
    assert server.wait(60) == 0
    assert "cancelling" not in server.log_text()


def test_a_second_signal_cuts_streams_with_the_drain_message(tiny_model_dir, tmp_path):
    import re

    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=(*LONG_FLAGS, "--grace", "60"))
    calls = [StreamCall(server.target, max_new_tokens=LONG, read_delay=0.002) for _ in range(3)]
    for call in calls:
        assert call.first.wait(30)
    server.signal(signal.SIGTERM)
    server.wait_for(re.compile("draining: "), 30)
    server.signal(signal.SIGINT)
    for call in calls:
        call.join(30)
        assert (call.code, call.message) == ("UNAVAILABLE", DRAINING)
        assert 0 < call.tokens < LONG
    assert server.wait(60) == 0
    log = server.log_text()
    assert "second signal, not waiting any longer: cancelling 3 call(s)" in log
    assert "grace period" not in log.split("draining: ", 1)[1]


def test_grace_period_over_cuts_streams_with_the_drain_message(tiny_model_dir, tmp_path):
    import re

    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=(*LONG_FLAGS, "--grace", "1"))
    calls = [StreamCall(server.target, max_new_tokens=LONG, read_delay=0.002) for _ in range(2)]
    for call in calls:
        assert call.first.wait(30)
    server.signal(signal.SIGTERM)
    server.wait_for(re.compile("draining: "), 30)
    for call in calls:
        call.join(30)
        assert (call.code, call.message) == ("UNAVAILABLE", DRAINING)
    assert server.wait(60) == 0
    assert "grace period of 1 s over: cancelling 2 call(s) in flight" in server.log_text()


def test_kill_9_during_generation_then_restart_loses_nothing(tiny_model_dir, tmp_path, kind_dirs):
    store = tmp_path / "store"
    server = start_server(
        tiny_model_dir, store, extra_args=LONG_FLAGS, env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    names = [f"k-{kind.lower().replace('_', '-')}" for kind in PEFT_KINDS]
    with admin(server.target) as client:
        for kind, name in zip(PEFT_KINDS, names, strict=True):
            client.upload_adapter(kind_dirs[kind], name)
        before = {a.name: (a.version, a.digest) for a in client.list_adapters()}
    calls = [StreamCall(server.target, adapter=name, max_new_tokens=LONG) for name in names]
    for call in calls:
        assert call.first.wait(30)
    server.proc.kill()
    assert server.wait(30) == -signal.SIGKILL
    for call in calls:
        assert call.join(30).code == "UNAVAILABLE"
    # A symlink planted while the server was down is reported, never followed or served.
    (store / "planted").symlink_to(kind_dirs["LORA"], target_is_directory=True)
    restarted = start_server(
        tiny_model_dir, store, extra_args=LONG_FLAGS, env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    try:
        with admin(restarted.target) as client:
            after = {a.name: (a.version, a.digest) for a in client.list_adapters()}
            assert after == before
            for name in names:
                assert client.generate("hello", adapter=name, max_new_tokens=3).generated_tokens == 3
            with pytest.raises(NotFound) as info:
                client.get_adapter("planted")
            assert "symlink" in info.value.message
        assert not [p for p in store.iterdir() if p.name.startswith((".upload-", ".replaced-", ".deleted-"))]
    finally:
        assert restarted.stop() == 0
