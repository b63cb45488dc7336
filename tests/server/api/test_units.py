"""Pure helpers of the API layer: token parsing and auth decisions, paging, labels, sampling, flags."""

from __future__ import annotations

import argparse

import grpc
import pytest

from adapterserve.server.api.app import add_serve_arguments, settings_from_args
from adapterserve.server.api.auth import AuthPolicy, bearer_token, decide
from adapterserve.server.api.grpc.admin import decode_page_token, encode_page_token, page_of
from adapterserve.server.api.grpc.errors import status_of
from adapterserve.server.api.grpc.requests import sampling_from_proto
from adapterserve.server.api.metrics import OTHER_LABEL, AdapterLabels
from adapterserve.server.errors import InvalidArgumentError, NotFoundError, QueueFullError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2
from tests.server.api.doubles import _record

ADMIN = "/adapterserve.v1.Admin/ListAdapters"
GENERATE = "/adapterserve.v1.Generation/Generate"
HEALTH = "/grpc.health.v1.Health/Check"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer  abc "),), "abc"),
        ((("authorization", "Basic abc"),), ""),
        ((("authorization", "Bearer"),), ""),
        ((("x-other", "Bearer abc"),), None),
    ],
)
def test_bearer_token(metadata, token):
    assert bearer_token(metadata) == token


def test_auth_decisions():
    policy = AuthPolicy(admin_token="s3cret")
    assert decide(policy, ADMIN, ())[0] is grpc.StatusCode.UNAUTHENTICATED
    assert decide(policy, ADMIN, (("authorization", "Bearer nope"),))[0] is grpc.StatusCode.PERMISSION_DENIED
    assert decide(policy, ADMIN, (("authorization", "Bearer s3cret"),)) is None
    assert decide(policy, GENERATE, ()) is None
    assert decide(policy, HEALTH, ()) is None
    closed = AuthPolicy(admin_token=None)
    assert (
        decide(closed, ADMIN, (("authorization", "Bearer anything"),))[0] is grpc.StatusCode.PERMISSION_DENIED
    )
    assert decide(AuthPolicy(admin_token=None, insecure_admin=True), ADMIN, ()) is None
    gen_locked = AuthPolicy(admin_token="a", generate_token="g")
    assert decide(gen_locked, GENERATE, ())[0] is grpc.StatusCode.UNAUTHENTICATED
    assert decide(gen_locked, GENERATE, (("authorization", "Bearer g"),)) is None
    assert decide(gen_locked, HEALTH, ()) is None


def test_status_mapping():
    assert status_of(NotFoundError("x"))[0] is grpc.StatusCode.NOT_FOUND
    assert status_of(QueueFullError("q"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = status_of(KeyError("internal detail"))
    assert code is grpc.StatusCode.INTERNAL and "internal detail" not in message


def test_paging():
    records = [_record(n, {"adapter_config.json": b"{}"}, "", 1) for n in ("c", "a", "b", "ab")]
    page, token, total = page_of(records, 2, "", "")
    assert [r.name for r in page] == ["a", "ab"] and total == 4 and token
    assert decode_page_token(token) == "ab"
    page, token, _ = page_of(records, 2, token, "")
    assert [r.name for r in page] == ["b", "c"] and token == ""
    assert [r.name for r in page_of(records, 0, "", "a")[0]] == ["a", "ab"]
    assert decode_page_token(encode_page_token("x.y-z")) == "x.y-z"
    with pytest.raises(InvalidArgumentError, match="page_token"):
        decode_page_token("bm9wZQ==")  # valid base64, not ours


def test_adapter_labels_are_bounded():
    labels = AdapterLabels(max_labels=3)
    assert labels.known("x") == OTHER_LABEL  # unknown names never get a label on their own
    granted = [labels.grant(f"a{i}") for i in range(10)]
    assert granted[:3] == ["a0", "a1", "a2"] and set(granted[3:]) == {OTHER_LABEL}
    assert labels.grant("a1") == "a1" and labels.known("a2") == "a2"
    assert labels.grant("") == "base"


def test_sampling_defaults_and_presence():
    limits = LimitSettings(max_new_tokens=32)
    params = sampling_from_proto(generation_pb2.SamplingParams(), limits)
    assert params.max_new_tokens == 32 and params.top_p == 1.0 and params.repetition_penalty == 1.0
    assert params.seed is None and params.temperature == 0.0
    params = sampling_from_proto(generation_pb2.SamplingParams(seed=0, top_p=0.5, stop=["\n"]), limits)
    assert params.seed == 0 and params.top_p == 0.5 and params.stop == ("\n",)


def test_flags_override_environment():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    env = {
        "ADAPTERSERVE_PORT": "6000",
        "ADAPTERSERVE_ADMIN_TOKEN": "tok",
        "ADAPTERSERVE_LIMITS__MAX_NEW_TOKENS": "100",
    }
    settings = settings_from_args(parser.parse_args(["--metrics-port", "0", "--max-queue", "5"]), env)
    assert settings.port == 6000 and settings.metrics_port == 0 and settings.admin_token == "tok"
    assert settings.engine.max_queue == 5 and settings.limits.max_new_tokens == 100
    assert not settings.insecure_admin and settings.host == "127.0.0.1"
    settings = settings_from_args(
        parser.parse_args(["--port", "7000", "--insecure-admin", "--grace", "3", "--quantize", "none"]), env
    )
    assert settings.port == 7000 and settings.insecure_admin and settings.grace_seconds == 3.0
    assert settings.quantize == "none"
