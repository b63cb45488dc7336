"""The Generation service: Generate (unary), GenerateStream (server streaming), GetServerInfo, Score
(log-likelihood of a continuation; see scoring.py).

Each call is validated and tokenized (requests.py), submitted to the engine, and its TokenEvents are
relayed. A call that ends early for any reason (client cancel or disconnect, deadline, error) cancels
its engine handle at once, so the row's cache and adapter slot are free for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from adapterserve.server.api.contracts import GenerationHandle
from adapterserve.server.api.convert import finish_reason_to_proto
from adapterserve.server.api.errors import map_errors, status_of
from adapterserve.server.api.lifecycle import DRAINING_MESSAGE, Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.requests import to_engine_request
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.api.scoring import collect_scores, score_response, to_scoring_request
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent, TokenLogprob
from adapterserve.server.errors import ServeError, UnavailableError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2, generation_pb2_grpc


@dataclass
class _Progress:
    """What one call has produced so far, and its timings (monotonic seconds)."""

    request: GenerationRequest
    started: float
    first_token_at: float | None = None
    token_ids: list[int] = field(default_factory=list)  # choice 0's
    finish_reason: FinishReason | None = None  # set once every choice has ended
    prompt_tokens: int = 0
    cut: bool = False  # the drain ended this call (the grace period is over)
    open_choices: int = 1  # choices (GenerateRequest.n) without their final event yet
    generated: int = 0  # tokens of every choice

    def timing(self, now: float) -> generation_pb2.Timing:
        first = self.first_token_at if self.first_token_at is not None else now
        return generation_pb2.Timing(time_to_first_token_s=first - self.started, total_s=now - self.started)


def _final_error(event: TokenEvent) -> BaseException:
    """The exception to fail a call with, for a final event that is not a normal finish."""
    if event.finish_reason is FinishReason.ERROR:
        return (
            event.error
            if event.error is not None
            else RuntimeError("engine reported an error without details")
        )
    # Only the server cancels a handle whose events are still read: the drain's cut at the end of the
    # grace period. The client hears what a new call hears while the server drains.
    return UnavailableError(DRAINING_MESSAGE)


def _cut(progress: _Progress, handle: GenerationHandle) -> None:
    """End a running call for the drain: its engine work stops, its next event ends it."""
    progress.cut = True
    handle.cancel()


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
        self._metrics = metrics
        self._lifecycle = lifecycle

    async def _events(
        self, request: generation_pb2.GenerateRequest, method: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[TokenEvent, _Progress]]:
        """Submit the request and yield (event, progress) until the final event; records metrics.

        Raises the engine's error for a failed request. Whatever ends the iteration early cancels the
        engine handle.
        """
        started = time.monotonic()
        label = self._metrics.labels.known(request.adapter)
        status = "OK"
        handle: GenerationHandle | None = None
        progress: _Progress | None = None
        uncut: Callable[[], None] | None = None
        try:
            runtime = self._runtime.get()
            engine_request = to_engine_request(request, runtime.tokenizer, self._limits)
            progress = _Progress(
                engine_request,
                started,
                prompt_tokens=len(engine_request.prompt_ids),
                open_choices=engine_request.n,
            )
            handle = await runtime.engine.submit(engine_request)
            uncut = self._lifecycle.on_cut(lambda: _cut(progress, handle))
            label = self._metrics.labels.grant(request.adapter)
            async for event in handle:
                if progress.cut:  # events may still be queued; the call ends now all the same
                    raise UnavailableError(DRAINING_MESSAGE)
                if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    raise _final_error(event)
                if event.token_ids and progress.first_token_at is None:
                    progress.first_token_at = time.monotonic()
                if event.index == 0:
                    progress.token_ids.extend(event.token_ids)
                progress.generated += len(event.token_ids)
                if event.finish_reason is not None:
                    progress.open_choices -= 1
                    if progress.open_choices <= 0:
                        progress.finish_reason = event.finish_reason
                    progress.prompt_tokens = event.prompt_tokens or progress.prompt_tokens
                yield event, progress
                if progress.finish_reason is not None:
                    return
            raise RuntimeError("engine stream ended without a finish reason")
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except BaseException as exc:
            status = status_of(exc)[0].name
            raise
        finally:
            if uncut is not None:
                uncut()
            if handle is not None and (progress is None or progress.finish_reason is None):
                handle.cancel()
            self._metrics.record_request(method, label, status)
            if status == "OK" and progress is not None:
                now = time.monotonic()
                ttft = None if progress.first_token_at is None else progress.first_token_at - started
                self._metrics.record_generation(
                    label, progress.prompt_tokens, progress.generated, ttft, now - started
                )

    @map_errors
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        async with self._lifecycle.call(generation=True):
            choices: dict[int, generation_pb2.GenerateChoice] = {}
            prompt_logprobs: tuple[TokenLogprob, ...] = ()
            last: _Progress | None = None
            async with contextlib.aclosing(self._events(request, "Generate", context)) as events:
                async for event, progress in events:
                    choice = choices.setdefault(event.index, generation_pb2.GenerateChoice(index=event.index))
                    choice.text += event.text
                    choice.token_ids.extend(event.token_ids)
                    choice.logprobs.extend(logprobs_to_proto(event.token_logprobs))
                    if event.finish_reason is not None:
                        choice.finish_reason = finish_reason_to_proto(event.finish_reason)
                    prompt_logprobs = event.prompt_logprobs or prompt_logprobs
                    last = progress
            if last is None or last.finish_reason is None:  # _events raises before this can happen
                raise ServeError("generation ended without a result")
            first = choices[0]
            return generation_pb2.GenerateResponse(
                request_id=last.request.request_id,
                text=first.text,
                token_ids=first.token_ids,
                finish_reason=first.finish_reason,
                prompt_tokens=last.prompt_tokens,
                generated_tokens=len(first.token_ids),
                timing=last.timing(time.monotonic()),
                adapter=request.adapter,
                logprobs=first.logprobs,
                prompt_logprobs=logprobs_to_proto(prompt_logprobs),
                choices=[choices[i] for i in sorted(choices)] if len(choices) > 1 else [],
            )

    @map_errors
    async def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async with self._lifecycle.call(generation=True):
            async with contextlib.aclosing(self._events(request, "GenerateStream", context)) as events:
                async for event, progress in events:
                    message = generation_pb2.GenerateStreamResponse(
                        request_id=progress.request.request_id,
                        text=event.text,
                        token_ids=event.token_ids,
                        logprobs=logprobs_to_proto(event.token_logprobs),
                        prompt_logprobs=logprobs_to_proto(event.prompt_logprobs),
                        index=event.index,
                    )
                    if event.finish_reason is not None:
                        message.finish_reason = finish_reason_to_proto(event.finish_reason)
                        message.prompt_tokens = progress.prompt_tokens
                        message.generated_tokens = event.generated_tokens
                        message.timing.CopyFrom(progress.timing(time.monotonic()))
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
        async with self._lifecycle.call(generation=True):
            label, status, handle, done = self._metrics.labels.known(request.adapter), "OK", None, False
            try:
                runtime = self._runtime.get()
                engine_request = to_scoring_request(request, runtime.tokenizer, self._limits)
                handle = await runtime.engine.submit(engine_request)
                label = self._metrics.labels.grant(request.adapter)
                logprobs = await collect_scores(handle)
                done = True
                return score_response(engine_request, logprobs)
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except BaseException as exc:
                status = status_of(exc)[0].name
                raise
            finally:
                if handle is not None and not done:
                    handle.cancel()
                self._metrics.record_request("Score", label, status)
