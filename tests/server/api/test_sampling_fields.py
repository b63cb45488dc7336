"""The wire fields of the OpenAI sampling features (n, seed, penalties, logit_bias, min_tokens,
logprobs): validated once, into the engine's request, with errors that name the field
(INVALID_ARGUMENT / HTTP 400)."""

from __future__ import annotations

import pytest

from adapterserve.server.api.grpc.requests import to_engine_request
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2

LIMITS = LimitSettings(max_n=4, max_logprobs=5)


def _request(**sampling) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        prompt="hello world", sampling=generation_pb2.SamplingParams(**sampling)
    )
    return request


def test_fields_reach_the_engine_request(tiny_tokenizer):
    request = _request(
        max_new_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logit_bias={7: 3.0, 2: -100.0},
        min_tokens=3,
        logprobs=2,
    )
    request.n = 3
    request.prompt_logprobs = 1
    engine = to_engine_request(request, tiny_tokenizer, LIMITS)
    p = engine.sampling
    assert (p.presence_penalty, p.frequency_penalty, p.min_tokens, p.logprobs) == (0.5, -1.0, 3, 2)
    assert p.logit_bias == ((2, -100.0), (7, 3.0))
    assert (engine.n, engine.prompt_logprobs) == (3, 1)
    plain = to_engine_request(_request(), tiny_tokenizer, LIMITS)
    assert (plain.n, plain.prompt_logprobs, plain.sampling.logprobs) == (1, None, None)
    assert not plain.sampling.logprobs_at_temperature
    scaled = _request(temperature=0.7, logprobs=0, logprobs_at_temperature=True)
    assert to_engine_request(scaled, tiny_tokenizer, LIMITS).sampling.logprobs_at_temperature
    ids = generation_pb2.GenerateRequest(prompt_ids=generation_pb2.TokenIds(ids=[5, 6, 7]))
    assert to_engine_request(ids, tiny_tokenizer, LIMITS).prompt_ids == (5, 6, 7)


@pytest.mark.parametrize(
    ("sampling", "extra", "named"),
    [
        ({"presence_penalty": 2.5}, {}, "sampling.presence_penalty"),
        ({"frequency_penalty": float("nan")}, {}, "sampling.frequency_penalty"),
        ({"logit_bias": {3: 101.0}}, {}, "sampling.logit_bias[3]"),
        ({"logit_bias": {10**6: 1.0}}, {}, "vocabulary"),
        ({"max_new_tokens": 4, "min_tokens": 5}, {}, "sampling.min_tokens"),
        ({"logprobs": 6}, {}, "max_logprobs"),
        ({}, {"n": 5}, "max_n"),
        ({}, {"prompt_logprobs": 6}, "max_logprobs"),
    ],
)
def test_refusals_name_the_field(tiny_tokenizer, sampling, extra, named):
    request = _request(**sampling)
    for key, value in extra.items():
        setattr(request, key, value)
    with pytest.raises(InvalidArgumentError, match=named.replace("[", r"\[").replace("]", r"\]")):
        to_engine_request(request, tiny_tokenizer, LIMITS)


def test_prompt_ids_are_checked(tiny_tokenizer):
    for ids, named in (([], "at least one"), ([10**6], "vocabulary")):
        request = generation_pb2.GenerateRequest(prompt_ids=generation_pb2.TokenIds(ids=ids))
        with pytest.raises(InvalidArgumentError, match=named):
            to_engine_request(request, tiny_tokenizer, LIMITS)
