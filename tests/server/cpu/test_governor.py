"""The contention governor: fewer engine threads while others want the CPUs, all back when they leave."""

from __future__ import annotations

import threading
import time

import pytest

from adapterserve.server.cpu import governor as cpu_governor
from adapterserve.server.cpu.governor import CpuGovernor, CpuSample, ProcCounters, Window


def _governor(max_threads: int = 2, cpus: int = 2) -> tuple[CpuGovernor, list[int]]:
    applied: list[int] = []
    return CpuGovernor(max_threads, cpus, applied.append, lambda: None), applied


def test_drops_to_the_cpus_the_others_leave_when_our_threads_wait() -> None:
    governor, applied = _governor(max_threads=8, cpus=8)
    assert governor.decide(Window(1.0, waiting=0.1, others=2.0)) == 8  # others busy, we are not hurt
    assert governor.decide(Window(1.0, waiting=1.5, others=2.6)) == 5  # 8 - 2.6 CPUs left: 5 threads
    assert applied == [5]


def test_two_cpus_beside_a_busy_client_run_one_thread_and_come_back_after_calm_windows() -> None:
    governor, applied = _governor()
    governor.decide(Window(1.0, waiting=0.9, others=0.3))
    assert governor.threads == 1
    for _ in range(cpu_governor.PROBE_WINDOWS - 1):  # the client still busy: no CPU free beyond ours
        governor.decide(Window(1.0, waiting=0.3, others=0.7))  # and our one thread waits now and then
    assert governor.threads == 1
    for _ in range(cpu_governor.CALM_WINDOWS - 1):
        governor.decide(Window(1.0, waiting=0.0, others=0.05))
    assert governor.threads == 1  # one calm window short
    governor.decide(Window(1.0, waiting=0.0, others=0.05))
    assert governor.threads == 2 and applied == [1, 2]


def test_a_thread_is_tried_back_beside_busy_cpus_and_kept_when_nobody_is_in_its_way() -> None:
    """Low-priority work (nice'd, fewer cgroup shares) keeps the CPUs busy but yields: our threads do not
    wait, so the thread tried back stays."""
    governor, applied = _governor()
    governor.decide(Window(1.0, waiting=0.9, others=0.9))  # a real competitor: down to one
    for _ in range(cpu_governor.PROBE_WINDOWS):  # now only low-priority work: busy, but we never wait
        governor.decide(Window(1.0, waiting=0.02, others=1.0))
    assert governor.threads == 2 and applied == [1, 2]
    for _ in range(10):
        governor.decide(Window(1.0, waiting=0.05, others=0.95))
    assert governor.threads == 2 and applied == [1, 2]


def test_a_failed_try_drops_back_and_the_next_waits_twice_as_long() -> None:
    """Beside a competitor at our priority one thread does not wait but two do: each try costs one
    window, and the tries get rarer (3, 6, 12 ... quiet windows, at most PROBE_WINDOWS_MAX)."""
    governor, applied = _governor()
    governor.decide(Window(1.0, waiting=0.9, others=0.9))
    waits = []
    for _ in range(5):
        quiet = 0
        while governor.threads == 1:
            governor.decide(Window(1.0, waiting=0.05, others=0.95))
            quiet += 1
        waits.append(quiet)
        governor.decide(Window(1.0, waiting=0.8, others=0.95))  # the try: two threads wait
        assert governor.threads == 1
    p = cpu_governor.PROBE_WINDOWS
    assert waits == [min(p * 2**i, cpu_governor.PROBE_WINDOWS_MAX) for i in range(5)]
    assert applied == [1] + [2, 1] * 5


def test_a_long_idle_starts_the_tries_over(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(cpu_governor.time, "monotonic", lambda: clock[0])
    governor, _ = _governor()
    governor.decide(Window(1.0, waiting=0.9, others=0.9))
    for _ in range(3):  # three failed tries: the next waits 24 windows
        while governor.threads == 1:
            governor.decide(Window(1.0, waiting=0.05, others=0.95))
        governor.decide(Window(1.0, waiting=0.8, others=0.95))

    def quiet_windows_to_a_try() -> int:
        n = 0
        while governor.threads == 1:
            governor.decide(Window(1.0, waiting=0.05, others=0.95))
            n += 1
        governor.decide(Window(1.0, waiting=0.8, others=0.95))
        return n

    governor.idle()  # a short pause between requests changes nothing
    clock[0] += cpu_governor.NEW_LOAD_IDLE_S / 4
    governor.after_step()
    assert quiet_windows_to_a_try() == 8 * cpu_governor.PROBE_WINDOWS
    governor.idle()  # a long one: the load may have changed
    clock[0] += cpu_governor.NEW_LOAD_IDLE_S
    governor.after_step()
    assert quiet_windows_to_a_try() == cpu_governor.PROBE_WINDOWS


def test_never_below_one_nor_above_the_plan() -> None:
    governor, applied = _governor(max_threads=2, cpus=4)
    for _ in range(10):
        governor.decide(Window(1.0, waiting=3.0, others=4.0))
    assert governor.threads == 1
    for _ in range(10):
        governor.decide(Window(1.0, waiting=0.0, others=0.0))
    assert governor.threads == 2 and applied == [1, 2]


def test_windows_come_from_counter_deltas_and_idle_restarts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(cpu_governor.time, "monotonic", lambda: clock[0])
    samples = iter(
        [
            CpuSample(wall=100.0, run_delay=10.0, cpus_busy=50.0, own_cpu=20.0),
            CpuSample(wall=101.0, run_delay=10.8, cpus_busy=52.0, own_cpu=21.4),  # waiting .8, others .6
            CpuSample(wall=300.0, run_delay=11.0, cpus_busy=60.0, own_cpu=25.0),
            CpuSample(wall=301.0, run_delay=11.0, cpus_busy=61.0, own_cpu=26.0),
        ]
    )
    applied: list[int] = []
    governor = CpuGovernor(2, 2, applied.append, lambda: next(samples))
    governor.after_step()
    clock[0] = 100.5
    governor.after_step()  # within the window: no read
    clock[0] = 101.0
    governor.after_step()
    assert governor.last_window == Window(1.0, waiting=pytest.approx(0.8), others=pytest.approx(0.6))
    assert applied == [1]
    governor.idle()  # the gap while idle is not a window
    clock[0] = 300.0
    governor.after_step()
    assert governor.last_window.seconds == 1.0
    clock[0] = 301.0
    governor.after_step()
    assert governor.last_window.seconds == 1.0 and governor.last_window.others == pytest.approx(0.0)


def test_proc_counters_see_a_busy_thread_and_the_run_delay_of_an_oversubscribed_process() -> None:
    counters = ProcCounters(range(256))
    first = counters.read()
    if first is None:
        pytest.skip("no /proc scheduler statistics on this system")
    stop = time.monotonic() + 0.6
    threads = [
        threading.Thread(target=lambda: [None for _ in iter(lambda: time.monotonic() < stop, False)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second = counters.read()
    assert second.own_cpu - first.own_cpu > 0.3  # our spinning threads' CPU time
    assert second.cpus_busy - first.cpus_busy >= second.own_cpu - first.own_cpu - 0.1
    assert second.run_delay >= first.run_delay


class _FakeCanary:
    """A canary whose test ends at the next poll with the waiting fraction it is given."""

    def __init__(self, waiting: float) -> None:
        self.waiting, self.running, self.started = waiting, False, 0

    def start(self) -> None:
        self.running, self.started = True, self.started + 1

    def poll(self) -> float | None:
        self.running = False
        return self.waiting


def _with_canary(waiting: float) -> tuple[CpuGovernor, list[int], _FakeCanary]:
    applied: list[int] = []
    canary = _FakeCanary(waiting)
    return CpuGovernor(2, 2, applied.append, lambda: None, canary=canary), applied, canary


def _quiet_until_the_canary_runs(governor: CpuGovernor, canary: _FakeCanary) -> int:
    windows = 0
    while not canary.running:
        governor.decide(Window(1.0, waiting=0.03, others=1.0))
        windows += 1
    return windows


def test_beside_a_competitor_the_canary_keeps_the_thread_out_and_tests_less_often() -> None:
    """At one thread beside work at our priority, only the canary spins: no engine thread is tried back
    (a try stalls every parallel region), and its tests get rarer (3, 6, 12 ... quiet windows)."""
    governor, applied, canary = _with_canary(waiting=0.5)
    governor.decide(Window(1.0, waiting=0.9, others=0.9))  # the competitor arrives: down to one
    waits = []
    for _ in range(5):
        waits.append(_quiet_until_the_canary_runs(governor, canary))
        governor.after_step()  # the canary's answer: it waited
    p = cpu_governor.PROBE_WINDOWS
    assert waits == [min(p * 2**i, cpu_governor.PROBE_WINDOWS_MAX) for i in range(5)]
    assert applied == [1] and governor.threads == 1 and governor.canary_tests == 5


def test_beside_yielding_work_the_canary_brings_the_thread_back_and_it_stays() -> None:
    governor, applied, canary = _with_canary(waiting=0.0)
    governor.decide(Window(1.0, waiting=0.9, others=0.9))
    assert _quiet_until_the_canary_runs(governor, canary) == cpu_governor.PROBE_WINDOWS
    governor.after_step()
    assert governor.threads == 2 and applied == [1, 2]
    for _ in range(10):  # low-priority work: the CPUs stay busy, our two threads do not wait
        governor.decide(Window(1.0, waiting=0.05, others=0.95))
    assert governor.threads == 2 and applied == [1, 2]


def test_a_thread_the_canary_let_in_leaves_when_it_waits_and_the_next_test_waits_longer() -> None:
    governor, applied, canary = _with_canary(waiting=0.0)
    governor.decide(Window(1.0, waiting=0.9, others=0.9))
    _quiet_until_the_canary_runs(governor, canary)
    governor.after_step()
    assert governor.threads == 2
    governor.decide(Window(1.0, waiting=0.8, others=0.9))  # the canary was wrong this time
    assert governor.threads == 1 and applied == [1, 2, 1]
    assert _quiet_until_the_canary_runs(governor, canary) == 2 * cpu_governor.PROBE_WINDOWS


def test_the_canary_sees_a_competitor_at_our_priority_and_not_a_niced_one() -> None:
    """The real canary beside real busy processes: twice as many spinners as our CPUs at our priority
    (it waits about 0.6 of its time), then as many at nice 19 (it hardly waits)."""
    import os
    import subprocess
    import sys

    from adapterserve.server.cpu.canary import CpuCanary

    if not CpuCanary.available():
        pytest.skip("no per-thread scheduler statistics on this system")
    cpus = len(os.sched_getaffinity(0))
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass\n"

    def waiting_beside(nice: int) -> float:
        hogs = [
            subprocess.Popen([sys.executable, "-c", spin], preexec_fn=lambda: os.nice(nice))
            for _ in range(min(2 * cpus, 32))
        ]
        try:
            time.sleep(0.3)  # the spinners are running
            canary = CpuCanary(seconds=0.5)
            return min(canary.measure() for _ in range(2))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()

    assert waiting_beside(0) >= cpu_governor.CANARY_BUSY  # no thread is tried
    assert waiting_beside(19) < cpu_governor.CANARY_BUSY  # a thread is tried (measured here: 0.000-0.002)


def test_a_canary_that_waited_a_little_leads_to_a_short_try_judged_on_its_own_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Low-priority work beside a light client at our priority: the canary waits a little (0.1-0.3), so
    a thread is tried, and judged on TRIAL_WINDOW_S of work instead of a whole window."""
    clock = [0.0]
    monkeypatch.setattr(cpu_governor.time, "monotonic", lambda: clock[0])
    run_delay = [0.0]
    applied: list[int] = []
    canary = _FakeCanary(waiting=0.2)
    governor = CpuGovernor(
        2, 2, applied.append, lambda: CpuSample(clock[0], run_delay[0], 0.0, 0.0), canary=canary
    )
    governor.decide(Window(1.0, waiting=0.9, others=0.9))
    _quiet_until_the_canary_runs(governor, canary)
    governor.after_step()  # the canary's answer: a try
    assert governor.threads == 2 and applied == [1, 2]
    clock[0] += cpu_governor.TRIAL_WINDOW_S
    run_delay[0] += 0.8 * cpu_governor.TRIAL_WINDOW_S  # the tried thread waits
    governor.after_step()
    assert governor.threads == 1 and applied == [1, 2, 1]
    assert _quiet_until_the_canary_runs(governor, canary) == 2 * cpu_governor.PROBE_WINDOWS


def test_a_load_that_fills_the_cpus_is_seen_early_in_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """At two threads the work is looked at every EARLY_WINDOW_S: our threads waiting STRONGLY_CONTENDED
    or more since the last look drop a thread at once; a light load (0.3) is left to the whole window."""
    clock, run_delay = [0.0], [0.0]
    monkeypatch.setattr(cpu_governor.time, "monotonic", lambda: clock[0])
    applied: list[int] = []
    governor = CpuGovernor(2, 2, applied.append, lambda: CpuSample(clock[0], run_delay[0], 0.0, 0.0))
    governor.after_step()  # the window starts
    look = cpu_governor.EARLY_WINDOW_S + 0.01
    clock[0] += look
    run_delay[0] += 0.3 * look
    governor.after_step()
    assert governor.threads == 2 and applied == []  # a light load: the window goes on
    clock[0] += 0.1
    run_delay[0] += 0.1 * 2.0
    governor.after_step()
    assert governor.threads == 2  # too soon for another look
    clock[0] += look
    run_delay[0] += 0.9 * look  # a load that fills the CPUs arrives
    governor.after_step()
    assert governor.threads == 1 and applied == [1]  # dropped at the next look, mid-window
    clock[0] += 0.5
    run_delay[0] += 0.5 * 0.9  # one thread now: no looks, only whole windows
    governor.after_step()
    assert governor.threads == 1 and governor.last_window.seconds == pytest.approx(0.1 + look)  # the look


def test_the_first_step_after_idle_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new load's first step (a long prefill at every thread) counts: the window starts before it."""
    clock, run_delay = [0.0], [0.0]
    monkeypatch.setattr(cpu_governor.time, "monotonic", lambda: clock[0])
    applied: list[int] = []
    governor = CpuGovernor(2, 2, applied.append, lambda: CpuSample(clock[0], run_delay[0], 0.0, 0.0))
    governor.idle()
    clock[0] += 10.0
    governor.before_step()
    clock[0] += 1.2  # one prefill step, both threads waiting for most of it
    run_delay[0] += 0.9 * 1.2
    governor.after_step()
    assert governor.threads == 1 and applied == [1]


def test_metered_work_counts_only_the_metered_steps_and_the_governor_judges_on_them() -> None:
    """With prefill workers the governor sizes the decode steps that run alone, and judges on those steps
    only: the counters' time between and beside them (prefill jobs on our own workers) never counts."""
    clock = {"t": 0.0, "delay": 0.0, "busy": 0.0, "own": 0.0}
    meter = cpu_governor.MeteredWork(
        lambda: CpuSample(clock["t"], clock["delay"], clock["busy"], clock["own"])
    )

    def advance(seconds: float, waiting: float, metered: bool) -> None:
        if metered:
            meter.begin()
        clock["t"] += seconds
        clock["delay"] += waiting * seconds
        clock["own"] += seconds
        clock["busy"] += seconds
        if metered:
            meter.end()

    applied: list[int] = []
    governor = CpuGovernor(2, 2, applied.append, meter.read, clock=meter.clock)
    for _ in range(10):  # beside our own prefill jobs our threads wait a lot: not metered, no decision
        governor.before_step()
        advance(0.3, waiting=0.9, metered=False)
        governor.after_step()
        governor.before_step()
        advance(0.05, waiting=0.0, metered=True)  # a decode step alone, nobody in its way
        governor.after_step()
    assert applied == [] and governor.threads == 2
    assert meter.read().wall == pytest.approx(0.5) and meter.read().run_delay == pytest.approx(0.0)
    for _ in range(10):  # now a competitor: the decode steps alone wait
        governor.before_step()
        advance(0.05, waiting=1.2, metered=True)
        governor.after_step()
    assert applied == [1]
