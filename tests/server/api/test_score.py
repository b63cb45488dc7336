"""The Score call through a real server (tiny base, real engine and store) and the SDK: the served
log-likelihood equals PEFT's forward for an uploaded adapter, and bad requests are refused clearly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapterserve import AsyncClient
from adapterserve.errors import InvalidArgument, NotFound
from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import ServerSettings
from tests.helpers.peft_refs import make_adapter, peft_reference_model
from tests.server.api.conftest import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def server(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        insecure_admin=True,
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    assert not task.done(), task.exception()
    async with AsyncClient(f"127.0.0.1:{app.ports.grpc}") as client:
        yield app, client
    app.request_stop()
    assert await asyncio.wait_for(task, 60) == 0


@torch.inference_mode()
def _peft_logprobs(model, tokenizer, prompt: str, continuation: str) -> list[float]:
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [float(logprobs[len(head) + i - 1, t]) for i, t in enumerate(tail)]


async def test_score_equals_peft_forward_for_base_and_adapter(server, tiny_model_dir, tmp_path):
    app, client = server
    tokenizer = app.runtime.get().tokenizer
    adapter_dir = make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "lora")
    await client.upload_adapter(adapter_dir, "my-lora")
    prompt, continuation = "The capital of France is", " Paris. The capital of Italy is Rome."
    for adapter, path in ((None, None), ("my-lora", adapter_dir)):
        result = await client.score(prompt, continuation, adapter=adapter)
        reference = _peft_logprobs(
            peft_reference_model(tiny_model_dir, path), tokenizer, prompt, continuation
        )
        assert result.adapter == (adapter or "")
        assert result.continuation_tokens == len(reference) == len(result.token_logprobs)
        assert result.token_logprobs == pytest.approx(reference, abs=1e-4)
        assert result.logprob_sum == pytest.approx(sum(reference), abs=1e-3)
        assert result.logprob_mean == pytest.approx(sum(reference) / len(reference), abs=1e-4)
        assert result.perplexity > 1.0
        assert result.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    chat = await client.score([{"role": "user", "content": "hello"}], "bonjour", adapter="my-lora")
    assert chat.continuation_tokens > 0 and chat.logprob_sum < 0


async def test_score_refuses_unknown_adapters_and_empty_continuations(server):
    _, client = server
    with pytest.raises(NotFound):
        await client.score("hello", " world", adapter="nope")
    with pytest.raises(InvalidArgument, match="continuation"):
        await client.score("hello", "")
    with pytest.raises(InvalidArgument, match="max_prompt_tokens"):
        await client.score("hello", " world" * 2000)
