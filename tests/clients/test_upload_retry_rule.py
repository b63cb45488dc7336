"""Uploads are retried on UNAVAILABLE only while no file byte has left the client.

A minimal Admin servicer (a test double, in this process) reads part of the stream and then answers
UNAVAILABLE; the client must not send the upload again. Against an unreachable address (nothing sent),
the client retries.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

import adapterserve
from adapterserve import Client, RetryPolicy
from adapterserve.v1 import admin_pb2_grpc


class _FailsMidUpload(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.calls = 0

    def UploadAdapter(self, request_iterator, context):
        self.calls += 1
        for message in request_iterator:
            if message.WhichOneof("payload") == "chunk":
                context.abort(grpc.StatusCode.UNAVAILABLE, "draining")


@pytest.fixture
def failing_admin():
    servicer = _FailsMidUpload()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_no_retry_after_file_bytes_were_sent(failing_admin, lora_dir):
    servicer, target = failing_admin
    retries: list = []
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.01, on_retry=lambda e, n, w: retries.append(n))
    with Client(target, retry=policy, timeout=10) as c:
        with pytest.raises(adapterserve.Unavailable):
            c.upload_adapter(lora_dir, "x", chunk_bytes=1024)
    assert servicer.calls == 1 and retries == []


def test_retry_when_nothing_was_sent(lora_dir):
    retries: list = []
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, on_retry=lambda e, n, w: retries.append(n))
    with Client("127.0.0.1:1", retry=policy, timeout=5) as c:
        with pytest.raises(adapterserve.Unavailable):
            c.upload_adapter(lora_dir, "x")
    assert retries == [1, 2]
