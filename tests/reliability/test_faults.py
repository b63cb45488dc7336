"""Faults against the real server: disconnects, adapter churn under running streams, a simulated
out-of-memory error, SIGTERM and a second signal with streams in flight, kill -9 and restart."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from adapterserve import Client
from adapterserve.errors import NotFound, ResourceExhausted
from adapterserve.retry import RetryPolicy
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.helpers.server_process import free_port, start_server
from tests.reliability.conftest import (
    ADMIN_TOKEN,
    AUTH,
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


STREAMS = 64
KILL_FLAGS = (*LONG_FLAGS[:-2], "--max-batch-size", str(STREAMS))  # every stream runs at the kill
TEMPORARY = (".upload-", ".replaced-", ".deleted-")
REMOVED = re.compile(r"removed (\d+) temporary entries left by an interrupted run")


def temporaries(store: Path) -> list[str]:
    """Entries of the store a crash could leave: upload, replace and delete folders, record temps."""
    found = [p.name for p in store.iterdir() if p.name.startswith(TEMPORARY) or p.name.endswith(".tmp")]
    versions = store / ".versions"
    return found + [f".versions/{p.name}" for p in versions.iterdir() if p.name.endswith(".tmp")]


def served_state(client: Client) -> dict[str, tuple[int, str]]:
    return {a.name: (a.version, a.digest) for a in client.list_adapters()}


def every_adapter_generates(client: Client, names) -> None:
    for name in names:
        assert client.generate("hello", adapter=name, max_new_tokens=3).generated_tokens == 3, name


def test_kill_9_during_generation_then_restart_loses_nothing(tiny_model_dir, tmp_path, kind_dirs):
    store, port = tmp_path / "store", free_port()
    env = {"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    server = start_server(tiny_model_dir, store, extra_args=KILL_FLAGS, port=port, env=env)
    names = [f"k-{kind.lower().replace('_', '-')}" for kind in PEFT_KINDS]
    with admin(server.target) as client:
        for kind, name in zip(PEFT_KINDS, names, strict=True):
            client.upload_adapter(kind_dirs[kind], name)
        before = served_state(client)
    calls = [
        StreamCall(server.target, adapter=names[i % len(names)], max_new_tokens=LONG) for i in range(STREAMS)
    ]
    for call in calls:
        assert call.first.wait(60)
    assert engine_load(server)[0] == STREAMS  # all 64 generating
    server.proc.kill()
    assert server.wait(30) == -signal.SIGKILL
    for call in calls:
        assert call.join(30).code == "UNAVAILABLE"
    # A symlink planted while the server was down is reported, never followed or served.
    (store / "planted").symlink_to(kind_dirs["LORA"], target_is_directory=True)
    # A client that calls while the server is down retries (the SDK's policy) until it is back.
    retried: list[str] = []
    policy = RetryPolicy(
        max_attempts=60, max_backoff=1.0, total_timeout=180, on_retry=lambda e, n, w: retried.append(e.code)
    )
    with (
        Client(f"127.0.0.1:{port}", retry=policy, timeout=60) as waiting_client,
        ThreadPoolExecutor(1) as pool,
    ):
        waiting = pool.submit(waiting_client.generate, "hello", adapter=names[0], max_new_tokens=3)
        wait_until(lambda: bool(retried), timeout=30)
        restarted = start_server(tiny_model_dir, store, extra_args=KILL_FLAGS, port=port, env=env)
        try:
            assert waiting.result(120).generated_tokens == 3
            assert set(retried) == {"UNAVAILABLE"}
            with admin(restarted.target) as client:
                assert served_state(client) == before  # the store is unchanged
                every_adapter_generates(client, names)
                with pytest.raises(NotFound) as info:
                    client.get_adapter("planted")
                assert "symlink" in info.value.message
                # every client cut by the kill retries its call, and it succeeds
                for i in range(STREAMS):
                    adapter = names[i % len(names)]
                    assert (
                        client.generate(
                            "The capital of France is", adapter=adapter, max_new_tokens=8, ignore_eos=True
                        ).generated_tokens
                        == 8
                    )
            assert temporaries(store) == []
        finally:
            assert restarted.stop() == 0


class UploadStorm:
    """Threads that upload and replace adapters as fast as they can (no retries) until stopped, and
    one upload held open after its first chunk (so a temporary folder exists when the server dies)."""

    def __init__(self, target: str, dirs: dict[str, Path], names: list[str], threads: int = 4) -> None:
        self.target, self.dirs, self.names = target, dirs, names
        self.stop, self.ok = threading.Event(), 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._channel = grpc.insecure_channel(target)
        self._held = threading.Thread(target=self._hold, daemon=True)

    def __enter__(self) -> UploadStorm:
        for t in [*self._threads, self._held]:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in [*self._threads, self._held]:
            t.join(60)
            assert not t.is_alive()
        self._channel.close()

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        with Client(self.target, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=30) as c:
            while not self.stop.is_set():
                kind = rng.choice(PEFT_KINDS)
                try:
                    c.upload_adapter(self.dirs[kind], rng.choice(self.names), overwrite=True)
                    self.ok += 1
                except Exception:  # UNAVAILABLE once the server is killed
                    time.sleep(0.05)

    def _hold(self) -> None:
        config = (self.dirs["LORA"] / "adapter_config.json").read_bytes()

        def messages():
            yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name="held", overwrite=True))
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(filename="adapter_config.json", data=config)
            )
            self.stop.wait(120)

        try:
            admin_pb2_grpc.AdminStub(self._channel).UploadAdapter(messages(), metadata=AUTH, timeout=120)
        except grpc.RpcError:
            pass


def test_kill_9_during_upload_storms_leaves_no_temporary(tiny_model_dir, tmp_path, kind_dirs):
    store = tmp_path / "store"
    env = {"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    flags = ("--upload-chunk-bytes", "4096")
    names = [f"u-{i}" for i in range(12)]
    removed = []
    server = start_server(tiny_model_dir, store, extra_args=flags, env=env)
    for _ in range(3):
        with UploadStorm(server.target, kind_dirs, names) as storm:
            wait_until(lambda: storm.ok >= 5 and any(store.glob(".upload-*")), timeout=60)
            time.sleep(0.3)
            server.proc.kill()
            assert server.wait(30) == -signal.SIGKILL
        server = start_server(tiny_model_dir, store, extra_args=flags, env=env)
        removed.append(int(server.wait_for(REMOVED, 10)[1]))
    try:
        assert all(n >= 1 for n in removed), removed  # at least the held upload's folder each time
        assert temporaries(store) == []
        with admin(server.target) as client:
            listed = [a.name for a in client.list_adapters()]
            assert listed and set(listed) <= set(names)
            every_adapter_generates(client, listed)
        assert "is not served" not in server.log_text()
    finally:
        assert server.stop() == 0
