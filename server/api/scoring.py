"""The Score call: a wire `ScoreRequest` -> an engine scoring request -> a `ScoreResponse`.

The prompt is tokenized exactly as Generate tokenizes it (requests.prompt_ids_from_proto); the
continuation is tokenized on its own without special tokens and appended, which is how the training
module joins a prompt and its completion. The engine runs it as a prefill-only request
(GenerationRequest.score_tokens), batched with everything else.
"""

from __future__ import annotations

import math
from typing import Any

from adapterserve.server.api.contracts import GenerationHandle
from adapterserve.server.api.requests import prompt_ids_from_proto, request_id_of
from adapterserve.server.engine.types import FinishReason, GenerationRequest
from adapterserve.server.errors import InvalidArgumentError, ServeError, UnavailableError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2


def to_scoring_request(
    request: generation_pb2.ScoreRequest, tokenizer: Any, limits: LimitSettings
) -> GenerationRequest:
    """The engine's scoring request for a wire request, with the prompt-length limit enforced."""
    request_id = request_id_of(request)  # type: ignore[arg-type]  # same request_id field
    prompt_ids = prompt_ids_from_proto(request, tokenizer)  # type: ignore[arg-type]  # same oneof input
    if not request.continuation:
        raise InvalidArgumentError("continuation: must not be empty")
    continuation = [int(t) for t in tokenizer(request.continuation, add_special_tokens=False)["input_ids"]]
    if not continuation:
        raise InvalidArgumentError("continuation: tokenizes to no tokens")
    total = len(prompt_ids) + len(continuation)
    if total > limits.max_prompt_tokens:
        raise InvalidArgumentError(
            f"continuation: prompt + continuation are {total} tokens, more than the limit "
            f"max_prompt_tokens={limits.max_prompt_tokens}"
        )
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids) + tuple(continuation),
        adapter=request.adapter or None,
        score_tokens=len(continuation),
    )


async def collect_scores(handle: GenerationHandle) -> tuple[float, ...]:
    """Wait for a scoring request's final event; its log-probs (raises the engine's error)."""
    async for event in handle:
        if event.finish_reason is FinishReason.SCORED:
            return event.logprobs
        if event.finish_reason is FinishReason.ERROR:
            raise event.error if event.error is not None else ServeError("scoring failed in the engine")
        if event.finish_reason is FinishReason.CANCELLED:
            raise UnavailableError("scoring was cancelled by the server (shutting down); retry")
    raise ServeError("the engine ended a scoring request without a result")


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
