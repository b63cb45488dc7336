"""One check of the generation fields for both transports: a gRPC request and the HTTP body that says the
same thing become the same engine request, and a bad field gets the same refusal from the one check
(validation.check_request), naming the field as each transport calls it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from adapterserve.server.api.grpc.requests import to_engine_request
from adapterserve.server.api.http.schemas import ChatCompletionRequest, CompletionRequest
from adapterserve.server.api.http.service import OpenAIService
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2

LIMITS = LimitSettings(max_new_tokens=32, max_stop_sequences=2, max_n=4, max_logprobs=5, max_prompt_tokens=64)
SERVICE_PY = Path(__file__).resolve().parents[3] / "server" / "api" / "http" / "service.py"


@pytest.fixture(scope="module")
def service() -> OpenAIService:
    return OpenAIService(RuntimeRef(), LIMITS, ServerMetrics(), Lifecycle(1), served_model_name="base")


def grpc_request(tokenizer, sampling: dict, **fields):
    request = generation_pb2.GenerateRequest(
        prompt="hello world", sampling=generation_pb2.SamplingParams(**sampling), **fields
    )
    return to_engine_request(request, tokenizer, LIMITS)


def http_request(service, tokenizer, body: dict, chat: bool = False):
    schema = ChatCompletionRequest if chat else CompletionRequest
    prompt = {"messages": [{"role": "user", "content": "hello world"}]} if chat else {"prompt": "hello world"}
    return service.engine_request(schema.model_validate({"model": "base", **prompt, **body}), "id", tokenizer)


def test_the_same_request_over_both_transports_is_the_same_engine_request(service, tiny_tokenizer):
    sampling = dict(
        max_new_tokens=8, temperature=0.75, top_k=5, top_p=0.875, repetition_penalty=1.25, seed=3,
        stop=["\n"], presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={7: 2.0, 2: -1.0},
        min_tokens=2, logprobs=3,
    )  # fmt: skip
    by_grpc = grpc_request(tiny_tokenizer, sampling, n=2)
    body = {**sampling, "n": 2}
    body["max_tokens"] = body.pop("max_new_tokens")
    body["logit_bias"] = {str(k): v for k, v in body["logit_bias"].items()}
    by_http = http_request(service, tiny_tokenizer, body)
    assert by_http == dataclasses.replace(by_grpc, request_id="id")
    assert by_http.sampling.logit_bias == ((2, -1.0), (7, 2.0)) and by_http.n == 2


@pytest.mark.parametrize(
    ("grpc_fields", "http_fields", "grpc_says", "http_says"),
    [
        ({"max_new_tokens": 0}, {"max_tokens": -1}, "sampling.max_new_tokens:", "max_tokens:"),
        ({"max_new_tokens": 33}, {"max_tokens": 33}, "--max-new-tokens", "--max-new-tokens"),
        ({"temperature": -1}, {"temperature": -1}, "sampling.temperature: -1", "temperature: -1"),
        ({"temperature": float("nan")}, {"temperature": float("nan")}, "sampling.temperature", "temperature"),
        ({"top_p": 0.0}, {"top_p": 0.0}, "sampling.top_p", "top_p"),
        ({"top_k": 200_000}, {"top_k": 200_000}, "sampling.top_k", "top_k"),
        ({"repetition_penalty": 11}, {"repetition_penalty": 11}, "sampling.repetition_penalty", "repetition_"),
        ({"stop": ["a", "b", "c"]}, {"stop": ["a", "b", "c"]}, "--max-stop-sequences", "--max-stop-sequences"),
        ({"stop": [""]}, {"stop": [""]}, "sampling.stop[0]", "stop[0]"),
        ({"presence_penalty": 2.5}, {"presence_penalty": 2.5}, "sampling.presence_penalty", "presence_penalty"),
        ({"frequency_penalty": -3}, {"frequency_penalty": -3}, "sampling.frequency_", "frequency_penalty"),
        ({"logit_bias": {3: 101.0}}, {"logit_bias": {"3": 101}}, "sampling.logit_bias[3]", "logit_bias[3]"),
        ({"logit_bias": {10**6: 1.0}}, {"logit_bias": {"1000000": 1}}, "vocabulary", "vocabulary"),
        ({"max_new_tokens": 4, "min_tokens": 5}, {"max_tokens": 4, "min_tokens": 5}, "sampling.min_", "min_tokens"),
        ({"logprobs": 6}, {"logprobs": 6}, "--max-logprobs", "--max-logprobs"),
    ],
)  # fmt: skip
def test_a_bad_field_gets_one_refusal_named_as_each_transport_names_it(
    service, tiny_tokenizer, grpc_fields, http_fields, grpc_says, http_says
):
    with pytest.raises(InvalidArgumentError) as by_grpc:
        grpc_request(tiny_tokenizer, grpc_fields)
    with pytest.raises(InvalidArgumentError) as by_http:
        http_request(service, tiny_tokenizer, http_fields)
    assert grpc_says in str(by_grpc.value) and http_says in str(by_http.value), (by_grpc.value, by_http.value)
    assert "sampling." not in str(by_http.value)  # HTTP names OpenAI's fields
    # the same check wrote both: the same message after the field's name
    assert str(by_grpc.value).split(":", 1)[1] == str(by_http.value).split(":", 1)[1] or "max_new" in str(
        grpc_fields
    )


@pytest.mark.parametrize(
    ("body", "chat", "says"),
    [
        ({"n": 5}, False, "--max-n"),
        ({"n": 0}, False, "n: 0 choices"),
        ({"max_tokens": 0}, True, "max_tokens: 0"),
        ({"max_completion_tokens": 40}, True, "max_completion_tokens: 40"),
        ({"logprobs": True, "top_logprobs": 6}, True, "top_logprobs: 6"),
        ({"echo": True, "logprobs": 6, "max_tokens": 0}, False, "logprobs: 6"),
        ({"seed": -1}, False, "seed: -1"),
        ({"top_k": -2}, False, "top_k: -2"),
        ({"prompt": "x" * 1000}, False, "prompt: "),
        ({"prompt": [10**6]}, False, "prompt: token ids"),
        ({"prompt": [-1]}, False, "prompt: token ids"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, True, "messages[0].role"),
    ],
)
def test_http_only_shapes_are_checked_by_the_same_check(service, tiny_tokenizer, body, chat, says):
    with pytest.raises(InvalidArgumentError, match=says.replace("[", r"\[").replace("]", r"\]")):
        http_request(service, tiny_tokenizer, body, chat=chat)


def test_an_invalid_model_name_is_refused_and_a_one_token_echo_scores_nothing(service, tiny_tokenizer):
    # no valid adapter name (a path, as OpenAI's own model names never are): 400, never a source lookup
    with pytest.raises(InvalidArgumentError, match="not a valid adapter name"):
        service.engine_request(CompletionRequest(model="../x", prompt="hi"), "id", tiny_tokenizer)
    echo = CompletionRequest(model="base", prompt=[5], max_tokens=0, echo=True)
    assert service.engine_request(echo, "id", tiny_tokenizer).score_tokens == 0
    echo = CompletionRequest(model="base", prompt=[5, 6, 7], max_tokens=0, echo=True)
    scored = service.engine_request(echo, "id", tiny_tokenizer)
    assert (scored.score_tokens, scored.prompt_logprobs) == (2, 0)


def test_the_http_service_builds_no_protobuf_request():
    tree = ast.parse(SERVICE_PY.read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert not any(m.startswith("adapterserve.v1") for m in imported), imported
    assert not any(m.endswith(".requests") for m in imported), imported  # gRPC's conversion
