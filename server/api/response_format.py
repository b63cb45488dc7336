"""The wire `ResponseFormat` (gRPC field, and what the HTTP API's `response_format` becomes) as the
engine's `StructuredOutput`. Checks what needs no grammar engine (the type, the schema's size and JSON
shape); the engine compiles the schema when it validates the request (structured.py) and refuses one
llguidance cannot compile, before it is queued."""

from __future__ import annotations

import json

from adapterserve.server.engine.types import MAX_SCHEMA_BYTES, StructuredKind, StructuredOutput
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.v1 import generation_pb2

_TYPES = {
    generation_pb2.ResponseFormat.TYPE_JSON_OBJECT: StructuredKind.JSON_OBJECT,
    generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA: StructuredKind.JSON_SCHEMA,
}


def response_format_proto(kind: str, schema: dict | None = None) -> generation_pb2.ResponseFormat:
    """The wire ResponseFormat of OpenAI's `response_format` ("text", "json_object", "json_schema")."""
    if kind == "json_schema":
        return generation_pb2.ResponseFormat(
            type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)
        )
    if kind == "json_object":
        return generation_pb2.ResponseFormat(type=generation_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    return generation_pb2.ResponseFormat(type=generation_pb2.ResponseFormat.TYPE_TEXT)


def structured_from_proto(fmt: generation_pb2.ResponseFormat) -> StructuredOutput | None:
    """None for free text (TYPE_TEXT); InvalidArgumentError naming the field for a bad format."""
    if fmt.type == generation_pb2.ResponseFormat.TYPE_TEXT:
        if fmt.json_schema:
            raise InvalidArgumentError("response_format.json_schema: only with type TYPE_JSON_SCHEMA")
        return None
    kind = _TYPES.get(fmt.type)
    if kind is None:
        raise InvalidArgumentError(f"response_format.type: unknown type {fmt.type}")
    if kind == StructuredKind.JSON_OBJECT:
        if fmt.json_schema:
            raise InvalidArgumentError("response_format.json_schema: only with type TYPE_JSON_SCHEMA")
        return StructuredOutput(kind)
    schema = fmt.json_schema
    if not schema:
        raise InvalidArgumentError("response_format.json_schema: required with type TYPE_JSON_SCHEMA")
    if len(schema.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgumentError(
            f"response_format.json_schema: {len(schema.encode())} bytes, at most {MAX_SCHEMA_BYTES}"
        )
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise InvalidArgumentError(f"response_format.json_schema: not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgumentError("response_format.json_schema: a JSON schema must be a JSON object")
    return StructuredOutput(kind, schema)
