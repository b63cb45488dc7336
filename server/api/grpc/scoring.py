"""The Score call: a wire `ScoreRequest` -> an engine scoring request -> a `ScoreResponse`.

The prompt is tokenized exactly as Generate tokenizes it (requests.prompt_ids_from_proto); the
continuation is tokenized on its own without special tokens and appended, which is how the training
module joins a prompt and its completion. The engine runs it as a prefill-only request
(GenerationRequest.score_tokens), batched with everything else; the call runs through the same
GenerationSession as Generate (session.py).
"""

from __future__ import annotations

import math
from typing import Any

from adapterserve.server.api.grpc.requests import prompt_ids_from_proto
from adapterserve.server.api.prompts import as_ids
from adapterserve.server.api.validation import GRPC_NAMES, check_request, request_id_or_new
from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2


def to_scoring_request(
    request: generation_pb2.ScoreRequest, tokenizer: Any, limits: LimitSettings
) -> GenerationRequest:
    """The engine's scoring request for a wire request, with the prompt-length limit enforced."""
    request_id = request_id_or_new(request.request_id)
    prompt_ids = prompt_ids_from_proto(request, tokenizer)  # type: ignore[arg-type]  # same oneof input
    if not request.continuation:
        raise InvalidArgumentError("continuation: must not be empty")
    continuation = as_ids(tokenizer(request.continuation, add_special_tokens=False))
    if not continuation:
        raise InvalidArgumentError("continuation: tokenizes to no tokens")
    scoring = GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids) + tuple(continuation),
        adapter=request.adapter or None,
        sampling=SamplingParams(max_new_tokens=1),  # nothing is generated
        score_tokens=len(continuation),
    )
    return check_request(scoring, limits, GRPC_NAMES, prompt_field="prompt + continuation")


def score_response(
    engine_request: GenerationRequest, logprobs: tuple[float, ...]
) -> generation_pb2.ScoreResponse:
    n = engine_request.score_tokens
    total = math.fsum(logprobs)
    return generation_pb2.ScoreResponse(
        request_id=engine_request.request_id,
        adapter=engine_request.adapter or "",
        logprob_sum=total,
        logprob_mean=total / n,
        continuation_tokens=n,
        prompt_tokens=len(engine_request.prompt_ids) - n,
        token_ids=engine_request.prompt_ids[-n:],
        token_logprobs=logprobs,
    )
