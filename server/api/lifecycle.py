"""Server phases (starting, serving, draining) and the count of calls in flight, for graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Callable

from adapterserve.server.errors import ResourceExhaustedError, UnavailableError

# What a call hears while the server drains: a new call at once, a running one if the grace period ends.
DRAINING_MESSAGE = "server is shutting down; retry on another replica or later"


class Phase(enum.Enum):
    STARTING = "starting"  # listening, model not loaded/warmed yet: API calls get UNAVAILABLE
    SERVING = "serving"
    DRAINING = "draining"  # shutting down: new calls get UNAVAILABLE, running ones finish


class Lifecycle:
    """Tracks the phase and the API calls in flight; `wait_idle` lets shutdown wait for them."""

    def __init__(self, max_generations: int) -> None:
        self.phase = Phase.STARTING
        self._max_generations = max_generations
        self._generations = 0
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cutters: dict[int, Callable[[], None]] = {}
        self._next_cutter = 0

    @property
    def calls_in_flight(self) -> int:
        return self._calls

    def refusal(self) -> str | None:
        """Why a new API call is refused now, or None when it may run."""
        if self.phase is Phase.STARTING:
            return "server is starting (loading and warming the model); retry shortly"
        if self.phase is Phase.DRAINING:
            return DRAINING_MESSAGE
        return None

    @contextlib.asynccontextmanager
    async def call(self, *, generation: bool = False) -> AsyncIterator[None]:
        """Count one API call while it runs; generation calls are bounded by max_concurrent_streams."""
        reason = self.refusal()
        if reason is not None:
            raise UnavailableError(reason)
        if generation and self._generations >= self._max_generations:
            raise ResourceExhaustedError(
                f"too many concurrent generation calls (limit max_concurrent_streams={self._max_generations})"
            )
        self._calls += 1
        self._generations += int(generation)
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            self._generations -= int(generation)
            if self._calls == 0:
                self._idle.set()

    def on_cut(self, cancel: Callable[[], None]) -> Callable[[], None]:
        """Register how to end one running call early (`cut()` calls it); returns the unregister."""
        key = self._next_cutter
        self._next_cutter += 1
        self._cutters[key] = cancel

        def remove() -> None:
            self._cutters.pop(key, None)

        return remove

    def cut(self) -> int:
        """End the registered calls now (the grace period is over); returns how many were told."""
        cutters = list(self._cutters.values())
        self._cutters.clear()
        for cancel in cutters:
            cancel()
        return len(cutters)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight, at most `timeout` seconds; True if idle."""
        waiter = asyncio.ensure_future(self._idle.wait())
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        waiter.cancel()
        return self._calls == 0
