"""Decode pacing: while the engine thread waits for CPUs, decode steps beside prefill jobs are spaced
`interval` apart; with CPUs to spare, or no job beside them, they run back to back; pacing lasts until
the engine idles; and the real counter reads this thread's waiting where Linux exposes it."""

from __future__ import annotations

import os

import pytest

from adapterserve.server.cpu.decode_pacing import CONTENDED_SHARE, DecodePacer, thread_run_delay


class FakeThread:
    """A clock and a run-delay counter that the test advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delay = 0.0

    def step(self, pacer: DecodePacer, wall: float, waited: float) -> None:
        """One decode step of `wall` seconds of which the thread waited `waited` for a CPU."""
        pacer.begin()
        self.now += wall
        self.delay += waited
        pacer.end()


def _pacer(thread: FakeThread, interval: float = 0.1) -> DecodePacer:
    return DecodePacer(interval, read_delay=lambda: thread.delay, clock=lambda: thread.now)


def test_a_thread_that_gets_its_cpu_is_never_held():
    thread = FakeThread()
    pacer = _pacer(thread)
    for _ in range(50):
        thread.step(pacer, 0.05, 0.002)
        assert pacer.hold(beside_jobs=True) == 0.0
    assert not pacer.pacing and pacer.paced_steps == 0


def test_under_contention_steps_beside_jobs_are_spaced_by_the_interval():
    thread = FakeThread()
    pacer = _pacer(thread, interval=0.1)
    for _ in range(20):
        thread.step(pacer, 0.06, 0.03)  # waited half of each step
    assert pacer.pacing
    # the last step started 0.06 s ago: 0.04 s to wait beside jobs, none without a job
    assert pacer.hold(beside_jobs=True) == pytest.approx(0.04)
    assert pacer.hold(beside_jobs=False) == 0.0
    thread.now += 0.05
    assert pacer.hold(beside_jobs=True) == 0.0  # the interval is over
    assert pacer.paced_steps == 1  # one held step, however often it was asked


def test_pacing_lasts_through_the_load_and_ends_after_an_idle_spell():
    thread = FakeThread()
    pacer = _pacer(thread)
    for _ in range(20):
        thread.step(pacer, 0.05, 0.025)
    assert pacer.pacing
    for _ in range(30):  # paced steps find a CPU at once: that alone does not end the pacing
        thread.step(pacer, 0.05, 0.0)
    assert pacer.pacing
    pacer.idle()
    thread.now += 1.0  # a short pause between requests: still the same load
    thread.step(pacer, 0.05, 0.0)
    assert pacer.pacing
    pacer.idle()
    thread.now += 2.5  # idle: the next load is judged afresh
    thread.step(pacer, 0.05, 0.0)
    assert not pacer.pacing and pacer.waiting_share < CONTENDED_SHARE
    assert pacer.hold(beside_jobs=True) == 0.0


def test_without_counters_nothing_is_paced():
    thread = FakeThread()
    pacer = DecodePacer(0.1, read_delay=lambda: None, clock=lambda: thread.now)
    for _ in range(10):
        pacer.begin()
        thread.now += 0.05
        pacer.end()
    assert pacer.hold(beside_jobs=True) == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="no per-thread schedstat")
def test_the_real_counter_reads_this_threads_waiting():
    first = thread_run_delay()
    sum(i * i for i in range(200_000))  # some work, so the scheduler has looked at us
    second = thread_run_delay()
    assert first is not None and second is not None and second >= first >= 0
