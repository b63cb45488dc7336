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

The transports only read events and build their replies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapterserve.server.api.contracts import GenerationHandle
from adapterserve.server.api.errors import status_name
from adapterserve.server.api.lifecycle import DRAINING_MESSAGE, Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent
from adapterserve.server.errors import UnavailableError

# Builds the validated engine request from the tokenizer (raises InvalidArgumentError for a bad one).
BuildRequest = Callable[[Any], GenerationRequest]
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
    """One call: iterate `events(build)` once; the attributes hold its progress and timings."""

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
        self.request: GenerationRequest | None = None
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.generated_tokens = 0  # tokens of every choice
        self.adapter_version = 0  # the adapter version serving the call (0: the base), once submitted
        self.finish_reason: FinishReason | None = None  # set once every choice has ended
        self.status: str | None = None  # the final status code name, once the call is over
        self._open_choices = 1
        self._cut = False  # the drain ended this call (the grace period is over)

    def timing(self, now: float | None = None) -> tuple[float, float]:
        """(time to first token, total) in seconds; before the first token, both are the time so far."""
        now = time.monotonic() if now is None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return first - self.started, now - self.started

    def _end_for_drain(self, handle: GenerationHandle) -> None:
        self._cut = True
        handle.cancel()

    def _take(self, event: TokenEvent) -> None:
        """Count one event into the progress; raises for a final event that fails the call."""
        if self._cut:  # events may still be queued; the call ends now all the same
            raise UnavailableError(DRAINING_MESSAGE)
        if event.finish_reason is FinishReason.ERROR:
            raise event.error or RuntimeError("engine reported an error without details")
        if event.finish_reason is FinishReason.CANCELLED:
            # Only the server cancels a handle whose events are still read: the drain (its cut at the
            # end of the grace period, or the engine stopping). The client hears what a new call hears.
            raise UnavailableError(DRAINING_MESSAGE)
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated_tokens += len(event.token_ids)
        if event.finish_reason is not None:
            self._open_choices -= 1
            if self._open_choices <= 0:  # every choice's final event came
                self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens or self.prompt_tokens

    async def events(
        self, build: BuildRequest, local: LocalAnswer | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Admit the call, build and submit its request, and yield its events until the final one.

        Raises (and records) what refuses or fails the call; whatever ends the iteration early cancels
        the engine handle.
        """
        shared = self._shared
        labels = shared.metrics.labels
        label = labels.known(self._adapter)
        status = "OK"
        handle: GenerationHandle | None = None
        uncut: Callable[[], None] | None = None
        try:
            async with shared.lifecycle.call(generation=True):
                runtime = shared.runtime.get()
                request = self.request = build(runtime.tokenizer)
                label = labels.known(request.adapter)
                self.prompt_tokens = len(request.prompt_ids)
                self._open_choices = request.n
                answer = None if local is None else local(request)
                if answer is not None:
                    self._take(answer)
                    yield answer
                    return
                handle = await runtime.engine.submit(request)
                self.adapter_version = getattr(handle, "adapter_version", 0)
                uncut = shared.lifecycle.on_cut(lambda: self._end_for_drain(handle))
                label = labels.grant(request.adapter)
                async for event in handle:
                    self._take(event)
                    yield event
                    if self.finish_reason is not None:
                        return
                if self._cut:  # the cut handle ended without a final event
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
            if handle is not None and self.finish_reason is None:
                handle.cancel()
            self.status = status
            shared.metrics.record_request(self.method, label, status, protocol=self.protocol)
            if status == "OK" and self.finish_reason is not None:
                ttft = None if self.first_token_at is None else self.first_token_at - self.started
                shared.metrics.record_generation(
                    label, self.prompt_tokens, self.generated_tokens, ttft, time.monotonic() - self.started
                )
