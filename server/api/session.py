"""One generation call from admission to its last event, the same for every transport.

gRPC's Generate, GenerateStream and Score (grpc servicer) and the OpenAI-compatible HTTP service each
turn their wire request into the engine's `GenerationRequest` (through validation.check_request) and
hand it to a `GenerationSession`, which owns what a call goes through on its way:

- admission: the lifecycle gate (UNAVAILABLE while starting or draining, RESOURCE_EXHAUSTED past
  max_concurrent_streams), held until the call ends;
- the engine: submit, relay the TokenEvents, fail the call on an error event; whatever ends it early
  (client cancel or disconnect, deadline, error, the drain's cut) cancels its engine handle at once, so
  the row's cache and adapter slot are free for the next request;
- metrics: one `requests_total` sample per call (protocol, method, adapter label, final status code),
  and for a call that ended normally its prompt and generated tokens, time to first token and time per
  output token;
- timing: time to first token and total time, as the transports report them.

A call with a list of prompts (HTTP completions, gRPC GenerateBatch) is one session over several
engine requests (`batch_events`): all built and checked before any is queued, queued together, their
events merged under call-wide choice indices, and all cancelled when the call ends early.

The transports only read events and build their replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapterserve.server.api.contracts import GenerationHandle
from adapterserve.server.api.errors import status_name
from adapterserve.server.api.lifecycle import DRAINING_MESSAGE, Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent
from adapterserve.server.errors import InvalidArgumentError, UnavailableError

# Builds the validated engine request from the tokenizer (raises InvalidArgumentError for a bad one).
BuildRequest = Callable[[Any], GenerationRequest]
# The same for a call with a list of prompts: one request per prompt, every one checked.
BuildRequests = Callable[[Any], list[GenerationRequest]]
# A final event a transport answers without the engine (e.g. HTTP's echo of a one-token prompt), or None.
LocalAnswer = Callable[[GenerationRequest], TokenEvent | None]


class Sessions:
    """What every session of one server shares: the runtime, the metrics and the lifecycle."""

    def __init__(self, runtime: RuntimeRef, metrics: ServerMetrics, lifecycle: Lifecycle) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.lifecycle = lifecycle

    def open(
        self,
        method: str,
        adapter: str | None,
        *,
        protocol: str = "grpc",
        deadline_passed: Callable[[], bool] | None = None,
    ) -> GenerationSession:
        """A session for one call of `method`; `adapter` (as the client named it) labels its metrics until
        the request is built; `deadline_passed` tells a deadline from a client cancel (gRPC)."""
        return GenerationSession(self, method, adapter, protocol, deadline_passed)


class GenerationSession:
    """One call: iterate `events(build)` (one prompt) or `batch_events(build_all)` (a list of prompts)
    once; the attributes hold its progress and timings."""

    def __init__(
        self,
        shared: Sessions,
        method: str,
        adapter: str | None,
        protocol: str,
        deadline_passed: Callable[[], bool] | None,
    ) -> None:
        self._shared = shared
        self.method = method
        self.protocol = protocol
        self._adapter = adapter
        self._deadline_passed = deadline_passed
        self.started = time.monotonic()
        self.requests: list[GenerationRequest] = []  # one per prompt, once built
        self.first_token_at: float | None = None
        self.queue_wait_s: float | None = None  # the engine's figure (TokenEvent.queue_wait_s), first prompt
        self.generated_tokens = 0  # tokens of every choice of every prompt
        self.adapter_version = 0  # the adapter version serving the call (0: the base), once submitted
        self.finish_reason: FinishReason | None = None  # set once every choice has ended
        self.status: str | None = None  # the final status code name, once the call is over
        self._prompt_tokens: list[int] = []  # per request
        self._offsets: list[int] = []  # per request: the call-wide index of its choice 0
        self._open_choices = 1
        self._cut = False  # the drain ended this call (the grace period is over)

    @property
    def request(self) -> GenerationRequest | None:
        """The call's (first) request, once built."""
        return self.requests[0] if self.requests else None

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of every request of the call (each prompt counted once, whatever its n)."""
        return sum(self._prompt_tokens)

    def prompt_tokens_of(self, position: int) -> int:
        """Prompt tokens of the request at `position` (as its final event counted them)."""
        return self._prompt_tokens[position]

    def locate(self, index: int) -> tuple[int, int]:
        """(position of its request, its choice in that request) of a call-wide choice index."""
        for position, request in enumerate(self.requests):
            if index < request.n:
                return position, index
            index -= request.n
        return 0, index

    def timing(self, now: float | None = None) -> tuple[float, float]:
        """(time to first token, total) in seconds; before the first token, both are the time so far."""
        now = time.monotonic() if now is None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return first - self.started, now - self.started

    def _end_for_drain(self, handles: list[GenerationHandle]) -> None:
        self._cut = True
        for handle in handles:
            handle.cancel()

    def _take(self, position: int, event: TokenEvent) -> TokenEvent:
        """Count one event of request `position` into the progress; returns it with its call-wide choice
        index (request position's offset + its choice). Raises for a final event that fails the call."""
        if self._cut:  # events may still be queued; the call ends now all the same
            raise UnavailableError(DRAINING_MESSAGE)
        if event.finish_reason is FinishReason.ERROR:
            raise event.error or RuntimeError("engine reported an error without details")
        if event.finish_reason is FinishReason.CANCELLED:
            # Only the server cancels a handle whose events are still read: the drain (its cut at the
            # end of the grace period, or the engine stopping). The client hears what a new call hears.
            raise UnavailableError(DRAINING_MESSAGE)
        if self.queue_wait_s is None:
            self.queue_wait_s = event.queue_wait_s
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated_tokens += len(event.token_ids)
        if event.finish_reason is not None:
            self._open_choices -= 1
            if self._open_choices <= 0:  # every choice's final event came
                self.finish_reason = event.finish_reason
            self._prompt_tokens[position] = event.prompt_tokens or self._prompt_tokens[position]
        offset = self._offsets[position]
        return event if offset == 0 else dataclasses.replace(event, index=offset + event.index)

    def events(self, build: BuildRequest, local: LocalAnswer | None = None) -> AsyncIterator[TokenEvent]:
        """Admit the call, build and submit its one request, and yield its events until the final one.

        Raises (and records) what refuses or fails the call; whatever ends the iteration early cancels
        the engine handle.
        """
        return self.batch_events(lambda tokenizer: [build(tokenizer)], local)

    async def batch_events(
        self, build_all: BuildRequests, local: LocalAnswer | None = None
    ) -> AsyncIterator[TokenEvent]:
        """`events` for a call of several requests (one per prompt, each with its n choices): built and
        checked all before any is queued, queued together (all or none), their events merged, each
        with its call-wide index (request i's choice j: i * n + j when every request has n choices).
        Whatever ends the iteration early cancels every request of the call.
        """
        shared = self._shared
        labels = shared.metrics.labels
        label = labels.known(self._adapter)
        status = "OK"
        handles: list[GenerationHandle] = []
        uncut: Callable[[], None] | None = None
        try:
            async with shared.lifecycle.call(generation=True):
                runtime = shared.runtime.get()
                requests = self.requests = list(build_all(runtime.tokenizer))
                if not requests:
                    raise InvalidArgumentError("prompt: at least one prompt is required")
                label = labels.known(requests[0].adapter)
                self._prompt_tokens = [len(r.prompt_ids) for r in requests]
                self._offsets = list(itertools.accumulate((r.n for r in requests[:-1]), initial=0))
                self._open_choices = sum(r.n for r in requests)
                answers = [None if local is None else local(r) for r in requests]
                queued = [i for i, answer in enumerate(answers) if answer is None]
                if queued:
                    if len(requests) == 1:
                        handles = [await runtime.engine.submit(requests[0])]
                    else:
                        handles = list(await runtime.engine.submit_batch([requests[i] for i in queued]))
                    # one adapter per call: its version serves every prompt (0: the base)
                    self.adapter_version = getattr(handles[0], "adapter_version", 0)
                    uncut = shared.lifecycle.on_cut(lambda: self._end_for_drain(handles))
                    label = labels.grant(requests[0].adapter)
                for position, answer in enumerate(answers):
                    if answer is not None:
                        yield self._take(position, answer)
                if self.finish_reason is not None:
                    return
                async with contextlib.aclosing(_merged(queued, handles)) as merged:
                    async for position, event in merged:
                        yield self._take(position, event)
                        if self.finish_reason is not None:
                            return
                if self._cut:  # the cut handles ended without a final event
                    raise UnavailableError(DRAINING_MESSAGE)
                raise RuntimeError("engine stream ended without a finish reason")
        except (asyncio.CancelledError, GeneratorExit):
            if self.finish_reason is None:  # closed after the final event: the call was served in full
                deadline = self._deadline_passed is not None and self._deadline_passed()
                status = "DEADLINE_EXCEEDED" if deadline else "CANCELLED"
            raise
        except BaseException as exc:
            status = status_name(exc)
            raise
        finally:
            if uncut is not None:
                uncut()
            if self.finish_reason is None:
                for handle in handles:
                    handle.cancel()
            self.status = status
            shared.metrics.record_request(self.method, label, status, protocol=self.protocol)
            if status == "OK" and self.finish_reason is not None:
                ttft = None if self.first_token_at is None else self.first_token_at - self.started
                shared.metrics.record_generation(
                    label,
                    self.prompt_tokens,
                    self.generated_tokens,
                    ttft,
                    time.monotonic() - self.started,
                    queue_wait_s=self.queue_wait_s,
                )


async def _merged(
    positions: list[int], handles: list[GenerationHandle]
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The events of several handles as they come, each with its request's position; ends when every
    handle's iteration has ended."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield positions[0], event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, handle: GenerationHandle) -> None:
        try:
            async for event in handle:
                queue.put_nowait((position, event))
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait((position, exc))
        finally:
            queue.put_nowait((position, None))

    tasks = [asyncio.ensure_future(pump(p, h)) for p, h in zip(positions, handles, strict=True)]
    try:
        live = len(tasks)
        while live:
            position, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
