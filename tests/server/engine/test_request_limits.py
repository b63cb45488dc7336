"""Requests refused before they are queued: each refusal names the field and its limit."""

from __future__ import annotations

import pytest

from adapterserve.server.engine.request_limits import check_request
from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import EngineSettings

SETTINGS = EngineSettings(max_batch_size=4)
VOCAB = 100


def _req(ids=(1, 2, 3), **kw) -> GenerationRequest:
    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__}
    return GenerationRequest("r", tuple(ids), sampling=SamplingParams(**sampling), **kw)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_req(ids=()), "prompt: the prompt is empty"),
        (_req(ids=(1, VOCAB)), r"prompt_ids: token ids must be in \[0, 100\)"),
        (_req(ids=(-1,)), r"prompt_ids: token ids must be in \[0, 100\)"),
        (_req(max_new_tokens=0), "max_new_tokens: must be at least 1"),
        (_req(temperature=-0.1), "sampling: temperature >= 0"),
        (_req(top_p=0.0), "0 < top_p <= 1"),
        (_req(top_p=1.5), "0 < top_p <= 1"),
        (_req(repetition_penalty=0.0), "repetition_penalty > 0"),
        (_req(min_tokens=9, max_new_tokens=8), r"min_tokens: 9 must be in 0..max_new_tokens \(8\)"),
        (_req(logprobs=101), r"logprobs: 101 alternatives, must be in 0..100"),
        (_req(prompt_logprobs=-1), r"prompt_logprobs: -1 alternatives, must be in 0..100"),
        (_req(n=0), r"n: 0 choices, must be in 1..4 \(the engine's rows\)"),
        (_req(n=5), r"n: 5 choices, must be in 1..4"),
        (_req(n=2, score_tokens=1), "a scoring request has one result"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(request_, message):
    with pytest.raises(InvalidArgumentError, match=message):
        check_request(request_, VOCAB, SETTINGS)


def test_requests_at_the_limits_pass():
    for request in (
        _req(ids=(0, VOCAB - 1)),
        _req(max_new_tokens=1, min_tokens=1, logprobs=VOCAB, prompt_logprobs=0),
        _req(top_p=1.0, temperature=0.0, n=SETTINGS.max_batch_size),
        _req(score_tokens=2),
    ):
        check_request(request, VOCAB, SETTINGS)


def test_logprob_alternatives_are_capped_below_a_large_vocabulary():
    with pytest.raises(InvalidArgumentError, match=r"logprobs: 1025 alternatives, must be in 0..1024"):
        check_request(_req(logprobs=1025), 50_000, SETTINGS)


def test_the_apis_logprobs_limit_cannot_exceed_the_engines_bound():
    """One definition: the engine's MAX_LOGPROBS is the ceiling of the server's max_logprobs setting, so a
    request the API lets through is never refused by the engine for its alternatives."""
    from pydantic import ValidationError

    from adapterserve.server.settings import MAX_LOGPROBS, LimitSettings

    widest = LimitSettings(max_logprobs=MAX_LOGPROBS)
    check_request(_req(logprobs=widest.max_logprobs), 50_000, SETTINGS)
    with pytest.raises(ValidationError):
        LimitSettings(max_logprobs=MAX_LOGPROBS + 1)
