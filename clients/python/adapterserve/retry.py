"""Retries with exponential backoff and full jitter, only where a retry cannot do harm.

What is retried (by the clients, using `RetryPolicy.retryable`):
- generation (`generate`, and `stream` until its first chunk arrived): UNAVAILABLE and RESOURCE_EXHAUSTED;
- reads and idempotent admin calls (`list_adapters`, `get_adapter`, `pin`, `unpin`, `health`): UNAVAILABLE;
- `upload_adapter`: UNAVAILABLE only while no file byte has been handed to gRPC; never past the first byte;
- `delete_adapter`: never (a lost reply would turn a success into NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from adapterserve.errors import AdapterServeError

T = TypeVar("T")

GENERATION_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
READ_CODES = frozenset({"UNAVAILABLE"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait between attempts.

    The n-th wait (n = 0, 1, ...) is uniform in [0, min(max_backoff, initial_backoff * multiplier**n)]
    ("full jitter"), so many clients that failed together do not come back together.

    Attributes:
        max_attempts: attempts in total, the first included (1 = never retry).
        initial_backoff: seconds, the cap of the first wait.
        max_backoff: seconds, the cap of any wait.
        multiplier: growth of the cap per attempt.
        total_timeout: seconds after the first attempt past which no new attempt starts (None = no bound).
        on_retry: called as on_retry(error, retry_number, wait_seconds) before each retry (for logging).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 3.0
    multiplier: float = 2.0
    total_timeout: float | None = 30.0
    on_retry: Callable[[AdapterServeError, int, float], None] | None = field(
        default=None, compare=False, repr=False
    )
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, retry_index: int) -> float:
        """Seconds to wait before retry number `retry_index` (0-based), with full jitter."""
        cap = min(self.max_backoff, self.initial_backoff * (self.multiplier**retry_index))
        return self.rng.uniform(0.0, cap)

    def delays(self) -> Iterator[float]:
        """The waits between attempts: max_attempts - 1 of them."""
        for i in range(self.max_attempts - 1):
            yield self.backoff(i)


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """The retry state of one logical call: counts attempts and the time spent under a policy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._started = time.monotonic()
        self._delays = policy.delays()
        self.retries = 0

    def next_wait(self, err: AdapterServeError, codes: frozenset[str]) -> float | None:
        """Seconds to wait before retrying after `err`, or None when it must be raised."""
        if err.code not in codes:
            return None
        wait = next(self._delays, None)
        if wait is None:
            return None
        total = self._policy.total_timeout
        if total is not None and time.monotonic() - self._started + wait > total:
            return None
        self.retries += 1
        if self._policy.on_retry is not None:
            self._policy.on_retry(err, self.retries, wait)
        return wait


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    codes: frozenset[str],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it returns, retrying AdapterServeErrors whose code is in `codes`."""
    attempts = Attempts(policy)
    while True:
        try:
            return fn()
        except AdapterServeError as err:
            wait = attempts.next_wait(err, codes)
            if wait is None:
                raise
            sleep(wait)


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    codes: frozenset[str],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`call_with_retry` for coroutines."""
    attempts = Attempts(policy)
    while True:
        try:
            return await fn()
        except AdapterServeError as err:
            wait = attempts.next_wait(err, codes)
            if wait is None:
                raise
            await sleep(wait)
