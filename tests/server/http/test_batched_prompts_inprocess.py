"""A list of prompts in one /v1/completions request, in process: refused whole before anything is queued
(engine double), and every row of it freed when its client disconnects (real engine, tiny base)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import LimitSettings, ServerSettings
from tests.helpers.tiny_model import build_tiny_tokenizer
from tests.server.api.conftest import default_settings, start_in_process, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
async def fake_server(tokenizer):
    limits = LimitSettings(max_prompt_tokens=64, max_new_tokens=32, max_batch_rows=8, max_batch_tokens=40)
    server = await start_in_process(
        tokenizer, default_settings(http_port=0, served_model_name="base", limits=limits)
    )
    url = f"http://127.0.0.1:{server.app.ports.http}/v1"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield server, client
    await server.channel.close()
    if not server.task.done():
        await server.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("prompt", "n", "named"),
    [
        (["Hello", "Hi", "x" * 400], 1, "prompt[2]: "),  # one prompt over max_prompt_tokens
        (["Hello"] * 5, 2, "max_batch_rows=8"),  # 5 prompts x n 2 = 10 rows
        (["one two three four five six seven eight nine ten"] * 6, 1, "max_batch_tokens=40"),
    ],
)
async def test_a_list_refused_for_one_prompt_or_its_size_queues_nothing(fake_server, prompt, n, named):
    server, client = fake_server
    for stream in (False, True):
        body = {"model": "base", "prompt": prompt, "n": n, "max_tokens": 2, "stream": stream}
        error = error_of(await client.post("/completions", json=body), 400)
        assert named in error["message"] and error["type"] == "invalid_request_error"
    assert server.engine.submitted == []


async def test_a_list_the_queue_has_no_room_for_is_a_429_and_queues_nothing(fake_server):
    server, client = fake_server
    server.engine.max_queue = 3
    body = {"model": "base", "prompt": ["a", "b", "c", "d"], "max_tokens": 2}
    error = error_of(await client.post("/completions", json=body), 429)
    assert "no room for 4" in error["message"]
    assert server.engine.submitted == []
    reply = await client.post("/completions", json={**body, "prompt": ["a", "b", "c"]})
    assert reply.status_code == 200
    assert [c["index"] for c in reply.json()["choices"]] == [0, 1, 2]
    # one engine request per prompt, queued together, each with its own id
    ids = [r.request_id for r in server.engine.submitted]
    assert len(set(ids)) == 3 and all(i.startswith(reply.json()["id"] + "-") for i in ids)


@pytest.fixture
async def real_http(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        http_port=0,
        served_model_name="base",
        insecure_admin=True,
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    assert not task.done(), task.exception()
    engine = app.runtime.get().engine
    step = engine.core.step

    def slow_step() -> None:  # ~50 ms a step: 200 tokens take 10 s, far longer than the test waits
        time.sleep(0.05)
        step()

    engine.core.step = slow_step
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.ports.http}/v1", timeout=30) as client:
        yield engine, client
    app.request_stop()
    assert await asyncio.wait_for(task, 60) == 0


BODY = {"model": "base", "prompt": ["Hello", "The capital", "One two"], "n": 2, "max_tokens": 200}
BODY.update(ignore_eos=True, temperature=0)


async def rows_free(engine) -> None:
    await wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, timeout=5)


async def test_a_stream_client_that_disconnects_frees_every_row_of_the_list(real_http):
    engine, client = real_http
    async with client.stream("POST", "/completions", json={**BODY, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        await wait_until(lambda: engine.stats().running == 6, timeout=10)  # 3 prompts x 2 choices
    started = time.monotonic()
    await rows_free(engine)
    assert time.monotonic() - started < 5


async def test_a_unary_client_that_disconnects_frees_every_row_of_the_list(real_http):
    engine, client = real_http
    call = asyncio.ensure_future(client.post("/completions", json=BODY))
    await wait_until(lambda: engine.stats().running == 6, timeout=10)
    call.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await call
    await rows_free(engine)


async def test_an_error_in_one_prompt_ends_the_list_and_frees_every_row(real_http, monkeypatch):
    import torch

    from adapterserve.server.engine import faults

    engine, client = real_http
    marked = (7, 7, 7, 7, 7)

    def inject(seqs) -> None:  # the device runs out of memory for the marked prompt's forward only
        if any(seq.request.prompt_ids == marked for seq in seqs):
            raise torch.OutOfMemoryError("simulated out of memory")

    monkeypatch.setattr(faults, "inject", inject)
    body = {**BODY, "prompt": [[5, 6, 8], list(marked), [9, 10, 11]]}
    error = error_of(await client.post("/completions", json=body), 429)
    assert "out of memory" in error["message"]
    await rows_free(engine)
    ok = await client.post("/completions", json={**body, "prompt": [[5, 6, 8], [9, 10, 11]], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
