"""The OpenAI-compatible API through the real `openai` package (sync, async, streaming), checked
against the gRPC API of the same server for the same adapter."""

from __future__ import annotations

import asyncio

import openai
import pytest

from adapterserve import Client
from tests.server.http.conftest import DEMO_ADAPTERS, GENERATE_TOKEN, SERVED_NAME

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Translate to French: hello world"}]


@pytest.fixture(scope="module")
def oai(http_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=GENERATE_TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(http_server):
    with Client(http_server.target, token=GENERATE_TOKEN) as client:
        yield client


def test_models_lists_the_base_and_every_adapter_with_its_kind(oai):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {SERVED_NAME, *DEMO_ADAPTERS}
    base = models[SERVED_NAME].model_dump()
    assert base["root"] == SERVED_NAME and base["parent"] is None and base["adapter_kind"] is None
    for name, kind in DEMO_ADAPTERS.items():
        entry = models[name].model_dump()
        assert (entry["parent"], entry["root"], entry["adapter_kind"]) == (SERVED_NAME, SERVED_NAME, kind)


@pytest.mark.parametrize("model", [SERVED_NAME, *DEMO_ADAPTERS])
def test_greedy_completion_equals_the_grpc_api(oai, grpc_client, model):
    adapter = None if model == SERVED_NAME else model
    want = grpc_client.generate(PROMPT, adapter=adapter, max_new_tokens=12, temperature=0)
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.model == model and got.object == "text_completion"
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == want.generated_tokens
    assert got.usage.total_tokens == want.prompt_tokens + want.generated_tokens


def test_greedy_chat_equals_the_grpc_api_and_the_stream_equals_the_reply(oai, grpc_client):
    want = grpc_client.generate(messages=CHAT, adapter="demo-lora", max_new_tokens=10, temperature=0)
    got = oai.chat.completions.create(model="demo-lora", messages=CHAT, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == want.generated_tokens

    chunks = list(
        oai.chat.completions.create(
            model="demo-lora",
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [got.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.generated_tokens


def test_streamed_completion_equals_the_unary_one(oai):
    unary = oai.completions.create(model="demo-prefix", prompt=PROMPT, max_tokens=9, temperature=0)
    pieces = list(
        oai.completions.create(model="demo-prefix", prompt=PROMPT, max_tokens=9, temperature=0, stream=True)
    )
    assert len(pieces) >= 2
    assert "".join(p.choices[0].text for p in pieces) == unary.choices[0].text
    assert pieces[-1].choices[0].finish_reason == unary.choices[0].finish_reason


def test_stop_and_seed_are_honoured(oai):
    full = (
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    )
    stop = full[3:5]
    assert stop.strip(), full
    cut = oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [
        oai.completions.create(
            model="demo-ia3", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_async_client_generates_concurrently_across_adapters(http_server, oai):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=http_server.http_url, api_key=GENERATE_TOKEN, max_retries=0)
        async with client:
            replies = await asyncio.gather(
                *(
                    client.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0)
                    for m in (SERVED_NAME, *DEMO_ADAPTERS)
                )
            )
            stream = await client.chat.completions.create(
                model="demo-prompt", messages=CHAT, max_tokens=5, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return [r.choices[0].text for r in replies] + [streamed]

    texts = asyncio.run(main())
    for model, text in zip((SERVED_NAME, *DEMO_ADAPTERS), texts, strict=False):
        alone = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert text == alone.choices[0].text  # a mixed batch changes no adapter's greedy output
    alone = oai.chat.completions.create(model="demo-prompt", messages=CHAT, max_tokens=5, temperature=0)
    assert texts[-1] == alone.choices[0].message.content


def test_unknown_model_is_a_404_never_the_base(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=3)
    assert caught.value.code == "model_not_found"
    assert "no-such-adapter" in caught.value.message
    # a `model` that cannot be an adapter name (a path) is refused before any lookup, as over gRPC
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="no/such", messages=CHAT, max_tokens=3, stream=True)


def test_wrong_or_missing_key_is_refused(http_server):
    wrong = openai.OpenAI(base_url=http_server.http_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        wrong.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=3)
    with pytest.raises(openai.PermissionDeniedError):
        wrong.models.list()
