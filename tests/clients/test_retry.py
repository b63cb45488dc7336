"""Backoff with full jitter, bounded attempts, and only the codes that are safe to retry."""

from __future__ import annotations

import random

import pytest

from adapterserve.errors import NotFound, ResourceExhausted, Unavailable
from adapterserve.retry import (
    GENERATION_CODES,
    READ_CODES,
    Attempts,
    RetryPolicy,
    acall_with_retry,
    call_with_retry,
)


def _policy(**kw) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(0), **kw)


def test_backoff_is_jittered_within_a_growing_capped_bound():
    p = _policy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, max_attempts=10)
    waits = [p.backoff(i) for i in range(8) for _ in range(20)]
    assert all(w >= 0 for w in waits)
    assert max(p.backoff(0) for _ in range(200)) <= 0.1
    assert max(p.backoff(7) for _ in range(200)) <= 0.5
    assert len(set(waits)) > 100  # jittered, not constant
    assert len(list(p.delays())) == 9


def test_retries_listed_codes_until_success():
    calls, sleeps = [], []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("starting")
        return "ok"

    assert call_with_retry(fn, _policy(max_attempts=5), GENERATION_CODES, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


def test_gives_up_after_max_attempts():
    calls = []

    def fn():
        calls.append(1)
        raise ResourceExhausted("queue full")

    with pytest.raises(ResourceExhausted):
        call_with_retry(fn, _policy(max_attempts=4), GENERATION_CODES, sleep=lambda s: None)
    assert len(calls) == 4


def test_never_retries_other_codes_or_codes_not_listed():
    calls = []

    def not_found():
        calls.append(1)
        raise NotFound("no adapter")

    with pytest.raises(NotFound):
        call_with_retry(not_found, _policy(), GENERATION_CODES, sleep=lambda s: None)
    assert len(calls) == 1

    def exhausted():
        calls.append(1)
        raise ResourceExhausted("too large")

    with pytest.raises(ResourceExhausted):  # READ_CODES: UNAVAILABLE only
        call_with_retry(exhausted, _policy(), READ_CODES, sleep=lambda s: None)
    assert len(calls) == 2


def test_total_timeout_stops_retrying():
    attempts = Attempts(
        _policy(max_attempts=100, initial_backoff=10.0, max_backoff=10.0, total_timeout=0.001)
    )
    # the first wait is uniform in [0, 10]; with rng seed 0 it is far above the 1 ms budget
    assert attempts.next_wait(Unavailable("x"), READ_CODES) is None


async def test_async_retry():
    calls = []

    async def fn():
        calls.append(1)
        if len(calls) < 2:
            raise Unavailable("x")
        return 7

    async def no_sleep(_):
        return None

    assert await acall_with_retry(fn, _policy(), READ_CODES, sleep=no_sleep) == 7
    assert len(calls) == 2


def test_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
