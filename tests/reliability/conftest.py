"""Shared pieces of the reliability suite: adapters of every kind, a shared real server, metrics.

Every test here talks to the real `adapterserve serve` subprocess (tests/helpers/server_process.py) on
loopback; tests that kill, stop or reconfigure a server start their own. Everything is bounded in count
and time (pytest-timeout on each module).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server_process import ServerProcess, start_server

ADMIN_TOKEN = "reliability-admin-token"
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
# The PEFT kinds the server serves, as PEFT saves them (prompt tuning and P-tuning both give PROMPT).
PEFT_KINDS = (
    "LORA",
    "IA3",
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "DORA",
    "BOTTLENECK",
    "HARD_PROMPT",
)
# Kinds PEFT's get_peft_model does not make as such: made by tests/helpers/peft_refs.make_adapter.
_REGISTRY_MADE = {"DORA": "dora", "BOTTLENECK": "bottleneck_houlsby", "HARD_PROMPT": "template"}
MAX_UPLOAD_BYTES = 400_000
SHARED_FLAGS = (
    "--max-batch-size",
    "8",
    "--max-queue",
    "64",
    "--max-upload-bytes",
    str(MAX_UPLOAD_BYTES),
    "--upload-chunk-bytes",
    "65536",
    "--max-new-tokens",
    "64",
    "--max-prompt-tokens",
    "48",
    "--max-seq-len",
    "256",
    "--grace",
    "20",
)


@pytest.fixture(scope="session")
def kind_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One real PEFT adapter directory per kind (saved by PEFT itself), keyed by PEFT type."""
    from tests.helpers.peft_adapters import save_peft_adapter
    from tests.helpers.peft_refs import make_adapter

    root = tmp_path_factory.mktemp("reliability-kinds")
    return {
        kind: make_adapter(tiny_model_dir, _REGISTRY_MADE[kind], root / kind.lower(), seed=i)
        if kind in _REGISTRY_MADE
        else save_peft_adapter(tiny_model_dir, root / kind.lower(), kind, seed=i)
        for i, kind in enumerate(PEFT_KINDS)
    }


@dataclass(frozen=True)
class Served:
    """A running server and its store directory."""

    server: ServerProcess
    store: Path

    @property
    def target(self) -> str:
        return self.server.target


@pytest.fixture(scope="package")
def shared(tiny_model_dir, tmp_path_factory) -> Iterator[Served]:
    """One server for the tests that neither stop it nor need other flags."""
    root = tmp_path_factory.mktemp("reliability-shared")
    server = start_server(
        tiny_model_dir,
        root / "store",
        extra_args=SHARED_FLAGS,
        env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    yield Served(server, root / "store")
    assert server.stop() == 0, server.log_text()


def scrape(server: ServerProcess) -> dict[str, list]:
    """The server's metrics: family name -> samples."""
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def metric_sum(families: dict[str, list], sample: str, **labels: str) -> float:
    """The sum of every sample named `sample` whose labels include `labels` (0 when none)."""
    total = 0.0
    for samples in families.values():
        for s in samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_engine_idle(server: ServerProcess, timeout: float = 10.0) -> None:
    """Until no row runs, nothing waits and no adapter slot is held by a request."""

    def idle() -> bool:
        m = scrape(server)
        return (
            metric_sum(m, "adapterserve_running_requests") == 0
            and metric_sum(m, "adapterserve_queue_depth") == 0
        )

    wait_until(idle, timeout)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StreamCall:
    """One GenerateStream call read on its own thread (optionally slowly), recording what came back."""

    def __init__(
        self,
        target: str,
        *,
        adapter: str = "",
        max_new_tokens: int = 64,
        read_delay: float = 0.0,
        request_id: str = "",
    ) -> None:
        import threading

        import grpc

        from adapterserve.v1 import generation_pb2, generation_pb2_grpc

        self.chunks = 0
        self.tokens = 0
        self.finish_reason = 0
        self.code = "PENDING"
        self.message = ""
        self.first = threading.Event()
        self._channel = grpc.insecure_channel(target)
        request = generation_pb2.GenerateRequest(
            prompt="The capital of France is",
            adapter=adapter,
            request_id=request_id,
            sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        )
        self._call = generation_pb2_grpc.GenerationStub(self._channel).GenerateStream(request, timeout=120)
        self._delay = read_delay
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for message in self._call:
                self.chunks += 1
                self.tokens += len(message.token_ids)
                self.finish_reason = message.finish_reason or self.finish_reason
                self.first.set()
                if self._delay:
                    time.sleep(self._delay)
            self.code = "OK"
        except grpc.RpcError as err:
            self.code, self.message = err.code().name, err.details() or ""
        finally:
            self.first.set()

    def cancel(self) -> None:
        self._call.cancel()

    def join(self, timeout: float = 60.0) -> StreamCall:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        self._channel.close()
        return self
