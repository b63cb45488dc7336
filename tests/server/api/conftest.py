"""Fixtures for the API tests: an in-process server on doubles, and the subprocess harness (harness.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import LimitSettings, ServerSettings
from tests.server.api.doubles import FakeEngine, FakeRuntimeFactory

ADMIN_TOKEN = "admin-secret-token"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.helpers.tiny_model import build_tiny_tokenizer

    return build_tiny_tokenizer()


@dataclass
class InProcessServer:
    app: ServeApp
    factory: FakeRuntimeFactory
    channel: grpc.aio.Channel
    task: asyncio.Task

    @property
    def engine(self) -> FakeEngine:
        assert self.factory.engine is not None
        return self.factory.engine

    @property
    def metrics_url(self) -> str:
        assert self.app.ports is not None
        return f"http://127.0.0.1:{self.app.ports.metrics}/metrics"

    def admin_md(self, token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def stop(self) -> int:
        self.app.request_stop()
        return await asyncio.wait_for(self.task, 30)


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def default_settings(**overrides) -> ServerSettings:
    values = dict(
        port=0,
        metrics_port=0,
        admin_token=ADMIN_TOKEN,
        grace_seconds=5.0,
        limits=LimitSettings(
            max_prompt_tokens=64,
            max_new_tokens=32,
            max_stop_sequences=2,
            max_upload_bytes=4096,
            upload_chunk_bytes=1024,
            max_concurrent_streams=8,
        ),
    )
    values.update(overrides)
    return ServerSettings(**values)


async def start_in_process(
    tokenizer, settings: ServerSettings, *, gate: asyncio.Event | None = None, wait_serving: bool = True
) -> InProcessServer:
    factory = FakeRuntimeFactory(tokenizer=tokenizer, gate=gate)
    app = ServeApp(settings, runtime_factory=factory)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.ports is not None or task.done())
    if wait_serving:
        await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done())
    assert not task.done(), task.exception()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}")
    return InProcessServer(app=app, factory=factory, channel=channel, task=task)


@pytest.fixture
async def served(tiny_tokenizer) -> AsyncIterator[InProcessServer]:
    """An in-process server on the engine/catalog doubles, SERVING, with the admin token ADMIN_TOKEN."""
    server = await start_in_process(tiny_tokenizer, default_settings())
    yield server
    await server.channel.close()
    if not server.task.done():
        await server.stop()
