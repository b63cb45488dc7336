"""Freed memory goes back to the system once the engine is idle (server/cpu/idle_memory.py)."""

from __future__ import annotations

import asyncio
import platform
import time

import pytest

from adapterserve.server.cpu import idle_memory
from adapterserve.server.cpu.idle_memory import IdleTrim, release_free_memory
from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.provider import StaticAdapterProvider
from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_trim_releases_once_per_idle_period():
    clock, released = FakeClock(), []
    trim = IdleTrim(1.0, release=lambda: released.append(clock.now) or True, clock=clock)
    assert not trim.idle()  # never worked: nothing to give back
    clock.now += 5
    assert not trim.idle() and released == []
    trim.worked()
    clock.now += 0.9
    assert not trim.idle()  # not idle long enough
    clock.now += 0.2
    assert trim.idle() and released == [pytest.approx(106.1)]
    clock.now += 10
    assert not trim.idle() and trim.releases == 1  # once per idle period
    trim.worked()
    clock.now += 1.0
    assert trim.idle() and trim.releases == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_calls_malloc_trim():
    assert release_free_memory()


def test_release_free_memory_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(idle_memory, "_malloc_trim", lambda: None)
    assert not release_free_memory()


async def test_the_engine_gives_memory_back_after_work(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    settings = EngineSettings(max_batch_size=2, max_seq_len=32)
    engine = Engine(base, StaticAdapterProvider(base.spec, settings), settings)
    await engine.start()
    try:
        await asyncio.sleep(0.6)
        assert engine._idle_trim.releases == 0  # started, never worked
        request = GenerationRequest("r", (5, 6, 7), None, SamplingParams(max_new_tokens=3, ignore_eos=True))
        events = [ev async for ev in await engine.submit(request)]
        assert events[-1].generated_tokens == 3
        deadline = time.monotonic() + 5
        while engine._idle_trim.releases == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert engine._idle_trim.releases == 1
    finally:
        await engine.stop()
