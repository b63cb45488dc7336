"""The SDK's json_schema= / response_format= arguments as the wire ResponseFormat."""

from __future__ import annotations

import json

import pytest

from adapterserve.convert import build_generate_request, build_response_format
from adapterserve.errors import InvalidArgument
from adapterserve.v1 import generation_pb2

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}}
T = generation_pb2.ResponseFormat


def test_each_way_to_ask_for_json():
    assert build_response_format(None, None) is None
    assert build_response_format("text", None) is None
    assert build_response_format("json_object", None).type == T.TYPE_JSON_OBJECT
    for fmt in (
        build_response_format(None, SCHEMA),
        build_response_format("json_schema", json.dumps(SCHEMA)),
        build_response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}, None),
    ):
        assert fmt.type == T.TYPE_JSON_SCHEMA and json.loads(fmt.json_schema) == SCHEMA
    request = build_generate_request("hi", None, None, json_schema=SCHEMA)
    assert request.HasField("response_format")
    assert not build_generate_request("hi", None, None).HasField("response_format")


@pytest.mark.parametrize(
    "response_format, json_schema",
    [("yaml", None), ("json_object", SCHEMA), ("json_schema", None), ("text", SCHEMA), (None, 3)],
)
def test_contradictions_are_refused_locally(response_format, json_schema):
    with pytest.raises(InvalidArgument):
        build_response_format(response_format, json_schema)
