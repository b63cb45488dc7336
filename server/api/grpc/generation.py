"""The Generation service: Generate (unary), GenerateStream (server streaming), GetServerInfo, Score
(log-likelihood of a continuation; see scoring.py).

Each call is validated and tokenized (requests.py, scoring.py) and runs through a GenerationSession
(../session.py: admission, engine, cancel, metrics, timing), the same as an HTTP call; this module only
turns the session's TokenEvents into the wire replies.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable

import grpc

from adapterserve.server.api.grpc.convert import finish_reason_to_proto
from adapterserve.server.api.grpc.errors import map_errors
from adapterserve.server.api.grpc.requests import to_engine_request
from adapterserve.server.api.grpc.scoring import score_response, to_scoring_request
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.api.session import GenerationSession, Sessions
from adapterserve.server.engine.types import FinishReason, TokenLogprob
from adapterserve.server.errors import ServeError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2, generation_pb2_grpc


def _timing(session: GenerationSession) -> generation_pb2.Timing:
    ttft, total = session.timing()
    return generation_pb2.Timing(time_to_first_token_s=ttft, total_s=total)


def _deadline_of(context: grpc.aio.ServicerContext) -> Callable[[], bool]:
    """Whether the call's deadline has passed (tells DEADLINE_EXCEEDED from a client cancel)."""

    def passed() -> bool:
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0

    return passed


def logprobs_to_proto(entries: tuple[TokenLogprob, ...]) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[generation_pb2.TopLogprob(token_id=t, logprob=v) for t, v in e.top],
        )
        for e in entries
    ]


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """grpc.aio servicer of adapterserve.v1.Generation."""

    def __init__(
        self,
        runtime: RuntimeRef,
        limits: LimitSettings,
        metrics: ServerMetrics,
        lifecycle: Lifecycle,
    ) -> None:
        self._runtime = runtime
        self._limits = limits
        self._sessions = Sessions(runtime, metrics, lifecycle)

    def _session(self, method: str, adapter: str, context: grpc.aio.ServicerContext) -> GenerationSession:
        return self._sessions.open(method, adapter, deadline_passed=_deadline_of(context))

    @map_errors
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        session = self._session("Generate", request.adapter, context)
        choices: dict[int, generation_pb2.GenerateChoice] = {}
        prompt_logprobs: tuple[TokenLogprob, ...] = ()
        build = functools.partial(to_engine_request, request, limits=self._limits)
        async with contextlib.aclosing(session.events(build)) as events:
            async for event in events:
                choice = choices.setdefault(event.index, generation_pb2.GenerateChoice(index=event.index))
                choice.text += event.text
                choice.token_ids.extend(event.token_ids)
                choice.logprobs.extend(logprobs_to_proto(event.token_logprobs))
                if event.finish_reason is not None:
                    choice.finish_reason = finish_reason_to_proto(event.finish_reason)
                prompt_logprobs = event.prompt_logprobs or prompt_logprobs
        if session.request is None or session.finish_reason is None:  # the session raises before this
            raise ServeError("generation ended without a result")
        first = choices[0]
        return generation_pb2.GenerateResponse(
            request_id=session.request.request_id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            prompt_tokens=session.prompt_tokens,
            generated_tokens=len(first.token_ids),
            timing=_timing(session),
            adapter=request.adapter,
            logprobs=first.logprobs,
            prompt_logprobs=logprobs_to_proto(prompt_logprobs),
            choices=[choices[i] for i in sorted(choices)] if len(choices) > 1 else [],
            adapter_version=session.adapter_version,
        )

    @map_errors
    async def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        session = self._session("GenerateStream", request.adapter, context)
        build = functools.partial(to_engine_request, request, limits=self._limits)
        async with contextlib.aclosing(session.events(build)) as events:
            async for event in events:
                message = generation_pb2.GenerateStreamResponse(
                    request_id=session.request.request_id,  # type: ignore[union-attr]  # built before events
                    text=event.text,
                    token_ids=event.token_ids,
                    logprobs=logprobs_to_proto(event.token_logprobs),
                    prompt_logprobs=logprobs_to_proto(event.prompt_logprobs),
                    index=event.index,
                    adapter_version=session.adapter_version,
                )
                if event.finish_reason is not None:
                    message.finish_reason = finish_reason_to_proto(event.finish_reason)
                    message.prompt_tokens = session.prompt_tokens
                    message.generated_tokens = event.generated_tokens
                    message.timing.CopyFrom(_timing(session))
                elif not event.text and not event.token_ids:
                    continue
                yield message

    @map_errors
    async def GetServerInfo(
        self, request: generation_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ServerInfo:
        return self._runtime.get().server_info

    @map_errors
    async def Score(
        self, request: generation_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ScoreResponse:
        session = self._session("Score", request.adapter, context)
        build = functools.partial(to_scoring_request, request, limits=self._limits)
        scores: tuple[float, ...] | None = None
        async with contextlib.aclosing(session.events(build)) as events:
            async for event in events:
                if event.finish_reason is FinishReason.SCORED:
                    scores = event.logprobs
        if scores is None or session.request is None:
            raise ServeError("the engine ended a scoring request without a result")
        return score_response(session.request, scores)
