"""Structured output as the engine's `StructuredOutput`, checked the same for both transports: what needs
no grammar engine (the schema's size and JSON shape). Each transport reads its own wire shape (gRPC's
ResponseFormat in grpc/requests, OpenAI's `response_format` in http/service) and calls this; the engine
compiles the schema when it validates the request (structured.py) and refuses one llguidance cannot
compile, before it is queued."""

from __future__ import annotations

import json

from adapterserve.server.engine.types import MAX_SCHEMA_BYTES, StructuredKind, StructuredOutput
from adapterserve.server.errors import InvalidArgumentError

SCHEMA_FIELD = "response_format.json_schema"


def structured_output(kind: StructuredKind, schema: str = "") -> StructuredOutput:
    """The engine's StructuredOutput of a JSON object or a JSON schema (its text, key order kept)."""
    if kind is StructuredKind.JSON_OBJECT:
        return StructuredOutput(kind)
    if not schema:
        raise InvalidArgumentError(f"{SCHEMA_FIELD}: required with a JSON schema response format")
    size = len(schema.encode())
    if size > MAX_SCHEMA_BYTES:
        raise InvalidArgumentError(f"{SCHEMA_FIELD}: {size} bytes, at most {MAX_SCHEMA_BYTES}")
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise InvalidArgumentError(f"{SCHEMA_FIELD}: not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgumentError(f"{SCHEMA_FIELD}: a JSON schema must be a JSON object")
    return StructuredOutput(kind, schema)
