"""Decode steps paced beside prefill jobs while the CPUs are fought over (a CPU engine with prefill workers).

Why: with prefill workers (prefill_workers.py) every request needs one prefill, so once prompts queue for
the workers the closed loop's throughput is the prefill rate. The engine thread meanwhile decodes back to
back: each step is cheaper per row the more rows it carries (the weights are read once per step), but
back-to-back steps carry few rows (the others still wait for their prefill) and take a CPU share the
prefills needed. With the CPUs to ourselves that costs nothing (the worker has its own CPU); beside a
load client on the same host it is the CPU the prefills did not get. Measured on 2 cores beside NVIDIA
AIPerf, unpaced: TTFT p50 2.5-3.0 s while inter-token p50 was 83-108 ms.

How: the engine thread's own waiting for a CPU (`/proc/thread-self/schedstat`, run delay) is read around
each decode step; its share of the step's wall time, averaged over recent steps, says whether our
threads are fighting for CPUs. Once it reaches `CONTENDED_SHARE`, while prefill jobs are in flight,
a decode step starts no sooner than `interval_s` after the last one (`EngineSettings.cpu.decode_pace_ms`);
the engine thread waits for that time, or less if a job ends (its rows join the next step). Decode
steps with no prefill job beside them, and every step on a machine where our threads do not wait, run
back to back as before. Where the counters cannot be read (not Linux, schedstat off), nothing is paced.

Pacing lasts until the engine has been idle `NEW_LOAD_IDLE_S` (then the next load is judged afresh), not
until the waiting falls: pacing itself is what lowers the engine thread's waiting (it sleeps while the
others run, and finds a CPU when it wakes), so a threshold on the way down flapped on and off within a
run beside AIPerf. On a machine with CPUs to spare pacing costs inter-token latency (steps at most every
`interval_s`), not throughput: the prefill worker keeps its own CPU either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from adapterserve.server.cpu.canary import thread_schedstat
from adapterserve.server.cpu.governor import NEW_LOAD_IDLE_S  # the governor's: one notion of a new load

log = logging.getLogger(__name__)

# The engine thread's share of a decode step spent waiting for a CPU, averaged: at or above it, the
# CPUs are fought over and decode steps beside prefill jobs are paced.
CONTENDED_SHARE = 0.15
SMOOTHING = 0.2  # weight of the newest step in the average


def thread_run_delay() -> float | None:
    """Seconds the calling thread has spent runnable but waiting for a CPU, None where unknown."""
    stat = thread_schedstat()
    return None if stat is None else stat[1] / 1e9


class DecodePacer:
    """Tracks the engine thread's waiting over decode steps and says how long to hold the next one."""

    def __init__(
        self,
        interval_s: float,
        read_delay: Callable[[], float | None] = thread_run_delay,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._read_delay, self._clock = read_delay, clock
        self.waiting_share = 0.0  # the average share of a decode step's wall time spent waiting
        self.paced_steps = 0  # decode steps held back (counted once per held step)
        self._last_start: float | None = None
        self._started: tuple[float, float] | None = None  # (wall, run delay) at the step's start
        self._holding = False
        self._paced = False
        self._idle_since: float | None = None

    @property
    def pacing(self) -> bool:
        return self._paced

    def hold(self, beside_jobs: bool) -> float:
        """Seconds the next decode step should wait (0: run it now)."""
        if not beside_jobs or not self.pacing or self._last_start is None:
            return 0.0
        left = self._last_start + self.interval_s - self._clock()
        if left > 0 and not self._holding:
            self._holding = True
            self.paced_steps += 1
        return max(0.0, left)

    def idle(self) -> None:
        """The engine has no work (called while it waits for some)."""
        if self._idle_since is None:
            self._idle_since = self._clock()

    def begin(self) -> None:
        """A decode step starts."""
        self._holding = False
        now = self._clock()
        if self._idle_since is not None:
            if now - self._idle_since >= NEW_LOAD_IDLE_S:
                self.waiting_share = 0.0
                if self._paced:
                    self._paced = False
                    log.info("decode pacing off: the engine was idle; the next load is judged afresh")
            self._idle_since = None
        self._last_start = now
        delay = self._read_delay()
        self._started = (now, delay) if delay is not None else None

    def end(self) -> None:
        """The decode step ended: its waiting share joins the average."""
        started, self._started = self._started, None
        delay = self._read_delay()
        if started is None or delay is None:
            return
        wall = self._clock() - started[0]
        if wall <= 0:
            return
        share = min(1.0, (delay - started[1]) / wall)
        self.waiting_share += SMOOTHING * (share - self.waiting_share)
        if not self._paced and self.waiting_share >= CONTENDED_SHARE:
            self._paced = True
            log.info(
                "decode pacing on (a decode step beside prefills every %.0f ms at most): the engine thread "
                "waited for a CPU %.0f%% of its decode steps",
                self.interval_s * 1000,
                100 * self.waiting_share,
            )
