"""Structured output end to end: the real server on the embedded default model (SmolLM2-135M) with its demo
adapters; 50 requests at once, through the `openai` package and gRPC, mixing JSON-schema rows, rows
without a grammar, a LoRA and prompt tuning in the same batches."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from adapterserve import Client
from tests.helpers.server_process import start_server

pytestmark = [pytest.mark.smollm2, pytest.mark.timeout(900)]

SERVED = "smollm2"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "continent": {"enum": ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 40},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "continent", "population_millions", "is_capital"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Madrid", "Delhi"]
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("structured-store") / "store"
    proc = start_server(
        smollm2_dir,
        store,
        extra_args=(
            "--http-port",
            "0",
            "--served-model-name",
            SERVED,
            "--demo-adapters",
            "--max-batch-size",
            "32",
        ),
        timeout=400,
    )
    yield proc
    assert proc.stop() == 0, proc.log_text()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=600)


def _chat(city: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Describe the city of {city} as JSON."}]


def _plan() -> list[tuple[str, str, bool]]:
    """(model, city, with a schema) for 50 requests: base / LoRA / prompt tuning, 40 with the schema."""
    models = [SERVED, "demo-lora", "demo-prompt"]
    return [(models[i % 3], CITIES[i % len(CITIES)], i % 5 != 4) for i in range(50)]


def _ask(oai: openai.OpenAI, model: str, city: str, schema: bool):
    kw = {"response_format": FORMAT} if schema else {}
    return oai.chat.completions.create(
        model=model, messages=_chat(city), max_tokens=MAX_TOKENS if schema else 24, temperature=0, **kw
    )


def test_fifty_mixed_requests_every_schema_output_validates_and_free_rows_are_unchanged(oai, server):
    plan = _plan()
    with ThreadPoolExecutor(25) as pool:
        replies = list(pool.map(lambda p: _ask(oai, *p), plan))
    for (model, city, schema), reply in zip(plan, replies, strict=True):
        choice = reply.choices[0]
        if schema:
            assert choice.finish_reason == "stop", (model, city, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    # rows without a grammar: the same (greedy) text as alone, without grammar rows in the batch
    for (model, city, schema), reply in zip(plan, replies, strict=True):
        if not schema:
            alone = _ask(oai, model, city, False)
            assert reply.choices[0].message.content == alone.choices[0].message.content, (model, city)


def test_completions_json_object_and_the_grpc_api(oai, server):
    got = oai.completions.create(  # the openai package has no response_format on completions: extra_body
        model="demo-lora",
        prompt="A JSON object describing a cat:",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    text = got.choices[0].text
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    with Client(server.target) as client:
        reply = client.generate(
            messages=_chat("Rome"), adapter="demo-prompt", max_new_tokens=MAX_TOKENS, json_schema=SCHEMA
        )
    assert reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), SCHEMA)


def test_a_schema_that_cannot_compile_is_a_400_naming_the_problem(oai):
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "strang"}}}},
    }
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=SERVED, messages=_chat("Oslo"), max_tokens=8, response_format=bad)
    assert info.value.status_code == 400
    error = info.value.body
    assert error["param"] == "response_format" and "strang" in error["message"], error


def test_a_bad_schema_over_grpc_is_invalid_argument(server):
    from adapterserve.errors import InvalidArgument

    with Client(server.target) as client, pytest.raises(InvalidArgument, match="strang"):
        client.generate(
            "hi", max_new_tokens=4, json_schema={"type": "object", "properties": {"a": {"type": "strang"}}}
        )


def test_a_streamed_reply_under_a_schema_is_the_unary_reply(oai):
    kw = {"model": "demo-lora", "messages": _chat("Lima"), "max_tokens": MAX_TOKENS, "temperature": 0}
    unary = oai.chat.completions.create(response_format=FORMAT, **kw).choices[0]
    chunks = list(oai.chat.completions.create(response_format=FORMAT, stream=True, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == unary.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == unary.finish_reason == "stop"
    jsonschema.validate(json.loads(streamed), SCHEMA)
