"""The Generation service: Generate (unary), GenerateStream (server streaming), GenerateBatch and
GenerateBatchStream (several prompts in one call, queued together), GetServerInfo, Score
(log-likelihood of a continuation; see scoring.py).

Each call is validated and tokenized (requests.py, scoring.py) and runs through a GenerationSession
(../session.py: admission, engine, cancel, metrics, timing), the same as an HTTP call; this module only
turns the session's TokenEvents into the wire replies.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable

import grpc

from adapterserve.server.api.grpc.convert import finish_reason_to_proto
from adapterserve.server.api.grpc.errors import map_errors
from adapterserve.server.api.grpc.requests import to_engine_request, to_engine_requests
from adapterserve.server.api.grpc.scoring import score_response, to_scoring_request
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.api.session import GenerationSession, Sessions
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent, TokenLogprob
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


def _stream_message(request_id: str, event: TokenEvent, index: int) -> generation_pb2.GenerateStreamResponse:
    """The GenerateStreamResponse of one event (choice `index`); on the final event, its finish reason
    and generated tokens (the caller adds the prompt tokens and the timing)."""
    message = generation_pb2.GenerateStreamResponse(
        request_id=request_id,
        text=event.text,
        token_ids=event.token_ids,
        logprobs=logprobs_to_proto(event.token_logprobs),
        prompt_logprobs=logprobs_to_proto(event.prompt_logprobs),
        index=index,
    )
    if event.finish_reason is not None:
        message.finish_reason = finish_reason_to_proto(event.finish_reason)
        message.generated_tokens = event.generated_tokens
    return message


class _Result:
    """One request's choices as they come, then its GenerateResponse."""

    def __init__(self) -> None:
        self.choices: dict[int, generation_pb2.GenerateChoice] = {}
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self.finished = 0
        self.first_token_at: float | None = None
        self.ended_at: float | None = None

    def add(self, event: TokenEvent, index: int) -> None:
        choice = self.choices.setdefault(index, generation_pb2.GenerateChoice(index=index))
        choice.text += event.text
        choice.token_ids.extend(event.token_ids)
        choice.logprobs.extend(logprobs_to_proto(event.token_logprobs))
        if event.finish_reason is not None:
            choice.finish_reason = finish_reason_to_proto(event.finish_reason)
            self.finished += 1
        self.prompt_logprobs = event.prompt_logprobs or self.prompt_logprobs

    def open_choices(self, n: int) -> int:
        return n - self.finished

    def timing(self, started: float) -> generation_pb2.Timing:
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        first = self.first_token_at if self.first_token_at is not None else end
        return generation_pb2.Timing(time_to_first_token_s=first - started, total_s=end - started)

    def response(
        self,
        request: GenerationRequest,
        prompt_tokens: int,
        timing: generation_pb2.Timing,
        adapter_version: int,
    ) -> generation_pb2.GenerateResponse:
        first = self.choices[0]
        return generation_pb2.GenerateResponse(
            request_id=request.request_id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(first.token_ids),
            timing=timing,
            adapter=request.adapter or "",
            logprobs=first.logprobs,
            prompt_logprobs=logprobs_to_proto(self.prompt_logprobs),
            choices=[self.choices[i] for i in sorted(self.choices)] if len(self.choices) > 1 else [],
            adapter_version=adapter_version,
        )


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
        result = _Result()
        build = functools.partial(to_engine_request, request, limits=self._limits)
        async with contextlib.aclosing(session.events(build)) as events:
            async for event in events:
                result.add(event, event.index)
        if session.request is None or session.finish_reason is None:  # the session raises before this
            raise ServeError("generation ended without a result")
        return result.response(
            session.request, session.prompt_tokens, _timing(session), session.adapter_version
        )

    @map_errors
    async def GenerateBatch(
        self, request: generation_pb2.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateBatchResponse:
        adapter = request.requests[0].adapter if request.requests else ""
        session = self._session("GenerateBatch", adapter, context)
        results: dict[int, _Result] = {}
        build = functools.partial(to_engine_requests, request, limits=self._limits)
        async with contextlib.aclosing(session.batch_events(build)) as events:
            async for event in events:
                position, choice = session.locate(event.index)
                result = results.setdefault(position, _Result())
                result.add(event, choice)
                if event.token_ids and result.first_token_at is None:
                    result.first_token_at = time.monotonic()
                if result.open_choices(session.requests[position].n) == 0:
                    result.ended_at = time.monotonic()
        if session.finish_reason is None or len(results) != len(session.requests):
            raise ServeError("generation ended without a result")
        ttft, total = session.timing()
        return generation_pb2.GenerateBatchResponse(
            responses=[
                results[i].response(
                    engine_request,
                    session.prompt_tokens_of(i),
                    results[i].timing(session.started),
                    session.adapter_version,
                )
                for i, engine_request in enumerate(session.requests)
            ],
            prompt_tokens=session.prompt_tokens,
            generated_tokens=session.generated_tokens,
            timing=generation_pb2.Timing(time_to_first_token_s=ttft, total_s=total),
        )

    @map_errors
    async def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        session = self._session("GenerateStream", request.adapter, context)
        build = functools.partial(to_engine_request, request, limits=self._limits)
        async with contextlib.aclosing(session.events(build)) as events:
            async for event in events:
                engine_request = session.request
                assert engine_request is not None  # built before the first event
                message = _stream_message(engine_request.request_id, event, event.index)
                message.adapter_version = session.adapter_version
                if event.finish_reason is not None:
                    message.prompt_tokens = session.prompt_tokens
                    message.timing.CopyFrom(_timing(session))
                elif not event.text and not event.token_ids:
                    continue
                yield message

    @map_errors
    async def GenerateBatchStream(
        self, request: generation_pb2.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateBatchStreamResponse]:
        adapter = request.requests[0].adapter if request.requests else ""
        session = self._session("GenerateBatchStream", adapter, context)
        results: dict[int, _Result] = {}
        build = functools.partial(to_engine_requests, request, limits=self._limits)
        async with contextlib.aclosing(session.batch_events(build)) as events:
            async for event in events:
                position, choice = session.locate(event.index)
                result = results.setdefault(position, _Result())
                if event.token_ids and result.first_token_at is None:
                    result.first_token_at = time.monotonic()
                message = _stream_message(session.requests[position].request_id, event, choice)
                message.adapter_version = session.adapter_version
                if event.finish_reason is not None:
                    message.prompt_tokens = session.prompt_tokens_of(position)
                    message.timing.CopyFrom(result.timing(session.started))
                elif not event.text and not event.token_ids:
                    continue
                yield generation_pb2.GenerateBatchStreamResponse(position=position, response=message)

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
