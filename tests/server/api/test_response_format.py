"""response_format on the wire: OpenAI's HTTP shapes and the gRPC ResponseFormat -> the same engine
StructuredOutput, and the refusals that need no grammar engine (each names its field)."""

from __future__ import annotations

import json

import pytest

from adapterserve.server.api.grpc.requests import structured_from_proto
from adapterserve.server.api.http.errors import to_openai_error
from adapterserve.server.api.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
)
from adapterserve.server.api.http.service import _structured
from adapterserve.server.engine.types import MAX_SCHEMA_BYTES, StructuredKind, StructuredOutput
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.v1 import generation_pb2

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("schema_type", [ChatCompletionRequest, CompletionRequest])
def test_openai_shapes_parse_on_both_endpoints(schema_type):
    body = dict(CHAT) if schema_type is ChatCompletionRequest else {"model": "m", "prompt": "hi"}
    for fmt in ({"type": "text"}, {"type": "json_object"}):
        assert (
            schema_type.model_validate({**body, "response_format": fmt}).response_format.type == fmt["type"]
        )
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    parsed = schema_type.model_validate({**body, "response_format": fmt}).response_format
    assert parsed.json_schema.schema_ == SCHEMA and parsed.json_schema.strict is True


@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "json_schema"}, "needs json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs json_schema.schema"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "only allowed with"),
        ({"type": "yaml"}, "response_format.type"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}},
            "unsupported field",
        ),
    ],
)
def test_malformed_response_formats_are_400s_naming_the_field(fmt, words):
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate({**CHAT, "response_format": fmt})
    message, param = describe_validation_error(info.value)
    assert words in message and param.startswith("response_format"), message


def test_both_transports_give_the_engine_the_same_format_with_the_schema_text_in_order():
    def http(fmt: dict) -> StructuredOutput | None:
        return _structured(ChatCompletionRequest.model_validate({**CHAT, "response_format": fmt}))

    def grpc(kind: int, schema: str = "") -> StructuredOutput | None:
        return structured_from_proto(generation_pb2.ResponseFormat(type=kind, json_schema=schema))

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    structured = http(fmt)
    assert structured == StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
    assert structured == grpc(generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json.dumps(SCHEMA))
    assert list(json.loads(structured.schema)["properties"]) == ["b", "a"]  # the output's key order
    assert http({"type": "json_object"}) == StructuredOutput(StructuredKind.JSON_OBJECT)
    assert grpc(generation_pb2.ResponseFormat.TYPE_JSON_OBJECT) == StructuredOutput(
        StructuredKind.JSON_OBJECT
    )
    assert http({"type": "text"}) is None and grpc(generation_pb2.ResponseFormat.TYPE_TEXT) is None
    big = {"type": "object", "description": " " * MAX_SCHEMA_BYTES}
    with pytest.raises(InvalidArgumentError, match="at most") as info:
        http({"type": "json_schema", "json_schema": {"name": "x", "schema": big}})
    assert to_openai_error(info.value, "chat.completions").param == "response_format"


@pytest.mark.parametrize(
    "fmt, words",
    [
        (generation_pb2.ResponseFormat(type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA), "required"),
        (
            generation_pb2.ResponseFormat(
                type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema="[1"
            ),
            "not valid JSON",
        ),
        (
            generation_pb2.ResponseFormat(
                type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema="[1]"
            ),
            "JSON object",
        ),
        (
            generation_pb2.ResponseFormat(
                type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=" " * (MAX_SCHEMA_BYTES + 1)
            ),
            "at most",
        ),
        (
            generation_pb2.ResponseFormat(
                type=generation_pb2.ResponseFormat.TYPE_JSON_OBJECT, json_schema="{}"
            ),
            "only with",
        ),
        (generation_pb2.ResponseFormat(type=7), "unknown type"),
    ],
)
def test_bad_wire_formats_are_invalid_argument(fmt, words):
    with pytest.raises(InvalidArgumentError, match="response_format") as info:
        structured_from_proto(fmt)
    assert words in str(info.value)
    error = to_openai_error(info.value, "chat.completions")
    assert (error.status, error.param) == (400, "response_format")
