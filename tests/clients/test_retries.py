"""Retries against a server that is briefly unavailable: the client starts before the server does.

The client first meets a refused connection, then a server that is still loading (UNAVAILABLE), and
succeeds once the server is SERVING, without the caller seeing any of it. This server also requires a
generation token, so `token=` is exercised too.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import adapterserve
from adapterserve import AsyncClient, Client, RetryPolicy
from tests.helpers.server_process import free_port, start_server

GEN_TOKEN = "gen-token-for-retry-tests"


def _policy(retries: list) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=200,
        initial_backoff=0.1,
        max_backoff=0.5,
        total_timeout=120,
        on_retry=lambda err, n, wait: retries.append(err),
    )


def test_sync_and_async_clients_ride_out_a_server_start(tiny_model_dir, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    sync_retries: list = []
    async_retries: list = []
    results: dict[str, object] = {}

    def sync_call() -> None:
        with Client(target, token=GEN_TOKEN, timeout=30, retry=_policy(sync_retries)) as c:
            try:
                results["sync"] = c.generate("hello", max_new_tokens=3, ignore_eos=True)
            except Exception as exc:  # reported by the assertion below
                results["sync"] = exc

    def async_call() -> None:
        async def run():
            async with AsyncClient(target, token=GEN_TOKEN, timeout=30, retry=_policy(async_retries)) as c:
                return [ch async for ch in c.stream("hello", max_new_tokens=3, ignore_eos=True)]

        try:
            results["async"] = asyncio.run(run())
        except Exception as exc:
            results["async"] = exc

    threads = [threading.Thread(target=sync_call), threading.Thread(target=async_call)]
    for t in threads:
        t.start()
    # Let both clients fail against the closed port a few times before the server exists.
    deadline = 20.0
    while (len(sync_retries) < 2 or len(async_retries) < 2) and deadline > 0:
        threading.Event().wait(0.1)
        deadline -= 0.1
    assert len(sync_retries) >= 2 and len(async_retries) >= 2
    server = start_server(
        tiny_model_dir,
        tmp_path / "store",
        port=port,
        env={"ADAPTERSERVE_GENERATE_TOKEN": GEN_TOKEN},
        extra_args=("--grace", "5"),
        wait_ready=False,
    )
    try:
        for t in threads:
            t.join(120)
        assert isinstance(results["sync"], adapterserve.GenerateResult), results["sync"]
        assert results["sync"].generated_tokens == 3
        chunks = results["async"]
        assert isinstance(chunks, list), chunks
        assert chunks[-1].generated_tokens == 3
        assert all(isinstance(e, adapterserve.Unavailable) for e in sync_retries + async_retries)

        # The same server refuses generation without the token, or with a wrong one.
        with Client(target, retry=RetryPolicy(max_attempts=1)) as no_token:
            with pytest.raises(adapterserve.Unauthenticated):
                no_token.generate("hello", max_new_tokens=1)
        with Client(target, token="wrong", retry=RetryPolicy(max_attempts=1)) as wrong:
            with pytest.raises(adapterserve.PermissionDenied):
                wrong.generate("hello", max_new_tokens=1)
    finally:
        assert server.stop() == 0


def test_no_retry_once_a_stream_has_started_or_for_non_retryable_codes(server):
    retries: list = []
    with Client(server.target, retry=_policy(retries)) as c:
        with pytest.raises(adapterserve.NotFound):
            c.generate("hi", adapter="no-such-adapter")
        with pytest.raises(adapterserve.Unauthenticated):
            c.list_adapters()
    assert retries == []
