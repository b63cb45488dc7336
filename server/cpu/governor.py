"""Fewer engine threads while other processes compete for the CPUs; all of them back when they leave.

Why: libgomp's workers spin at every barrier of a parallel region. With the machine to itself that is
what makes a CPU decode step fast; beside a busy process (a load client on the same host, a tokenizer,
a second replica, a CPU quota shared with a sidecar) a worker that lost its core stalls the whole region
and the spinning ones take the core the other process wanted (server/cpu/threads.py). With fewer
threads than free CPUs nothing waits for a descheduled worker.

How: after engine steps, at most once per `window_s` of work, it reads two counters of the kernel:
- the run delay of every thread of this process (`/proc/self/task/*/schedstat`, 2nd field: ns spent
  runnable but waiting for a CPU). Divided by the window, it is how many of our threads were waiting on
  average: the harm itself. At `CONTENDED` or more, the engine drops to the CPUs left free by the others
  (at least one thread fewer).
- the CPU time the other processes used on the CPUs we may run on (`/proc/stat` per CPU minus our own
  `/proc/self/stat`): when it leaves a whole CPU free beyond our threads for `CALM_WINDOWS` windows in a
  row, the engine takes one thread back.
- Busy CPUs are not always in our way: work at a lower priority (a nice'd batch job, a process in a
  cgroup with fewer CPU shares) fills every idle cycle yet yields at once. So after `PROBE_WINDOWS`
  windows in a row in which our threads hardly waited, the governor asks a canary (canary.py: a
  thread of ours that spins for 0.2 s and reads how long it waited for a CPU) whether one more thread
  would get a CPU. Below `CANARY_BUSY` one thread is tried back and judged on the next
  `TRIAL_WINDOW_S` of work: if our threads wait (`CONTENDED`), it drops again. At `CANARY_BUSY` or more
  (a competitor at our priority fills the CPU) nothing is tried. A failed canary or try doubles the
  quiet windows before the next test (at most `PROBE_WINDOWS_MAX`; after `NEW_LOAD_IDLE_S` of idle, a
  new load, the tests start over). The canary costs the competitor ~0.1 s of CPU; a tried thread beside
  a competitor at our priority costs the engine the whole try (its barriers wait for the descheduled
  worker), which is why the canary asks first. Without a canary (no per-thread counters) the trial runs alone.
Threads never exceed the planned count and never go below one. Where the counters cannot be read (not
Linux, schedstat off), the governor does nothing. The thread count is set on the engine thread (OpenMP's
count is per thread), between steps.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

WINDOW_S = 1.0  # seconds of work between two decisions
# CPUs' worth of our threads waiting for a CPU: we are in someone's way (or they in ours). Measured on 2
# cores: beside NVIDIA AIPerf 0.75-1.0, beside a light client (the openai package, 16 threads) 0.27-0.29,
# where the full thread count is as fast (docs/cpu.md): the threshold sits between.
CONTENDED = 0.4
FREE_TO_GROW = 0.75  # a CPU this free (after the others and our threads) is worth one more thread
CALM_WINDOWS = 3  # windows in a row with that much free before a thread comes back
QUIET = CONTENDED / 2  # our threads' waiting below this: the CPUs we have are not fought over
PROBE_WINDOWS = 3  # quiet windows in a row before a thread is tried back beside busy CPUs
PROBE_WINDOWS_MAX = 48  # the wait doubles after each failed try, up to this
# The canary's waiting fraction (docs/cpu.md, 2 cores, one engine thread): beside nice'd spinners
# 0.000-0.002; beside NVIDIA AIPerf 0.19-0.53; beside nice'd spinners and a light client 0.11-0.34.
CANARY_BUSY = 0.35  # at or above: a competitor at our priority fills it, no try (the next test waits longer)
TRIAL_WINDOW_S = 0.3  # below, a thread is tried and judged on this much work, not a whole window
# At more than one thread, the work is looked at every this much of it: waiting this much since the last look
# (beside AIPerf 0.7-1.1; a light client 0.27-0.29 over whole windows) drops a thread without waiting
# for the window's end (a load arriving at two threads cost 2-3 s of a 45 s AIPerf run before).
EARLY_WINDOW_S = 0.3
STRONGLY_CONTENDED = 0.6
NEW_LOAD_IDLE_S = 2.0  # idle this long: a new load (the governor's tries start over; decode pacing resets)


class Canary(Protocol):
    """cpu_canary.CpuCanary as the governor uses it."""

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def poll(self) -> float | None: ...


@dataclass(frozen=True)
class CpuSample:
    """Cumulative counters at one instant: wall (s), our threads' run delay (s), busy time of the CPUs
    we may run on (s, every process), our process's CPU time (s)."""

    wall: float
    run_delay: float
    cpus_busy: float
    own_cpu: float


def _ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


class ProcCounters:
    """Reads CpuSample from /proc for the CPUs in `cpus`. `read()` returns None where it cannot."""

    def __init__(self, cpus: Sequence[int], exclude: Collection[int] = ()):
        self._cpus = {f"cpu{c}" for c in cpus}
        self._exclude = exclude  # thread ids whose waiting is not the engine's (the canary's; read live)
        self._hz = _ticks_per_second()

    def _run_delay(self) -> float:
        total = 0
        for path in glob.glob("/proc/self/task/*/schedstat"):
            if self._exclude and int(path.split("/")[-2]) in self._exclude:
                continue
            try:
                with open(path) as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                continue
        return total / 1e9

    def _cpus_busy(self) -> float:
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                fields = line.split()
                if fields[0] not in self._cpus:
                    continue
                values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                busy += sum(values) - values[3] - values[4] - values[7]
        return busy / self._hz

    def _own_cpu(self) -> float:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._hz  # utime, stime

    def read(self) -> CpuSample | None:
        if not os.path.exists("/proc/self/schedstat"):
            return None
        try:
            return CpuSample(time.monotonic(), self._run_delay(), self._cpus_busy(), self._own_cpu())
        except (OSError, ValueError, IndexError):
            return None


class MeteredWork:
    """Counters that advance only over the work that is metered: with prefill workers
    (prefill_workers.py) the engine thread's own threads matter only for decode steps with no prefill job
    beside them (a step beside jobs runs on one thread, and its waiting is our own workers' doing). The
    governor reads `read` and `clock` instead of /proc's counters and the wall clock: its windows are
    made of metered steps only. `begin`/`end` bracket one metered step (two /proc reads)."""

    def __init__(self, read: Callable[[], CpuSample | None]):
        self._read = read
        self._start: CpuSample | None = None
        self._total = CpuSample(0.0, 0.0, 0.0, 0.0)

    def begin(self) -> None:
        self._start = self._read()

    def end(self) -> None:
        start, self._start = self._start, None
        end = self._read() if start is not None else None
        if start is None or end is None:
            return
        t = self._total
        self._total = CpuSample(
            t.wall + end.wall - start.wall,
            t.run_delay + end.run_delay - start.run_delay,
            t.cpus_busy + end.cpus_busy - start.cpus_busy,
            t.own_cpu + end.own_cpu - start.own_cpu,
        )

    def read(self) -> CpuSample:
        return self._total

    def clock(self) -> float:
        return self._total.wall


@dataclass(frozen=True)
class Window:
    """One window's rates, in CPUs: `waiting` of our threads runnable without a CPU, `others` busy
    with other processes' work on our CPUs."""

    seconds: float
    waiting: float
    others: float


def _window(previous: CpuSample, sample: CpuSample) -> Window:
    seconds = sample.wall - previous.wall  # idle periods never count: idle() restarts the window
    return Window(
        seconds=seconds,
        waiting=(sample.run_delay - previous.run_delay) / seconds,
        others=max(0.0, (sample.cpus_busy - previous.cpus_busy) - (sample.own_cpu - previous.own_cpu))
        / seconds,
    )


class CpuGovernor:
    """Decides the engine's thread count from the counters; `apply(threads)` sets it (engine thread)."""

    def __init__(
        self,
        max_threads: int,
        cpus: int,
        apply: Callable[[int], None],
        read: Callable[[], CpuSample | None],
        window_s: float = WINDOW_S,
        canary: Canary | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """clock: the time windows are measured in (the wall clock; MeteredWork.clock for metered work)."""
        self.max_threads, self.cpus = max_threads, cpus
        self.threads = max_threads
        self.window_s = window_s
        self._apply, self._read = apply, read
        self._clock = clock or (lambda: time.monotonic())  # looked up per call (tests patch it)
        self._last: CpuSample | None = None
        self._look: CpuSample | None = None  # the last early look (or the window's start)
        self._calm = 0
        self._quiet = 0  # quiet windows in a row (below max_threads)
        self._probe_after = PROBE_WINDOWS
        self._probing = False  # the last thread added was a try beside busy CPUs
        self._idle_since: float | None = None
        self._canary = canary
        self.canary_tests = 0
        self.changes = 0
        self.last_window: Window | None = None

    def before_step(self) -> None:
        """Call before each engine step: after an idle spell the window starts with this step, so the
        first step of a new load (a long prefill, at every thread) is measured too."""
        if self._last is None:
            self._last = self._look = self._read()

    def after_step(self) -> None:
        """Call after each engine step: decides once per window of work, and on a canary's result."""
        if self._canary is not None and self._canary.running:
            waiting = self._canary.poll()
            if waiting is not None:
                self.canary_result(waiting)
        if self._idle_since is not None:
            if time.monotonic() - self._idle_since >= NEW_LOAD_IDLE_S:
                self._probe_after, self._quiet = PROBE_WINDOWS, 0
            self._idle_since = None
        now = self._clock()
        window_s = TRIAL_WINDOW_S if self._probing else self.window_s  # a try is judged quickly
        if self._last is not None and now - self._last.wall < window_s:
            look = self._look or self._last
            if self.threads > 1 and now - look.wall >= EARLY_WINDOW_S:
                self._early_check(look)
            return
        sample = self._read()
        if sample is None:
            return
        previous, self._last, self._look = self._last, sample, sample
        if previous is None:
            return
        self._judge(_window(previous, sample))

    def _early_check(self, look: CpuSample) -> None:
        """A look at the work since the last look (EARLY_WINDOW_S or more): our threads waiting this much
        (a load that fills the CPUs has just arrived) are not left to run to the window's end."""
        sample = self._read()
        if sample is None:
            return
        self._look = sample
        window = _window(look, sample)
        if window.waiting >= STRONGLY_CONTENDED:
            self._last = sample
            self._judge(window)

    def _judge(self, window: Window) -> None:
        self.last_window = window
        log.debug(
            "CPU window %.2f s: threads %d, ours waiting %.2f, others busy %.2f",
            window.seconds,
            self.threads,
            window.waiting,
            window.others,
        )
        self.decide(window)

    def idle(self) -> None:
        """The engine has no work: the next window starts with the next step. A long idle (a new load
        may follow) starts the tries of a thread back over (`NEW_LOAD_IDLE_S`)."""
        self._last = None
        if self._idle_since is None:
            self._idle_since = time.monotonic()

    def decide(self, window: Window) -> int:
        """The thread count after `window` (applied if it changed)."""
        target, why = self.threads, ""
        contended = window.waiting >= CONTENDED
        if self._probing and not contended:  # the thread tried back is not in anyone's way: it stays
            self._probing, self._probe_after = False, PROBE_WINDOWS
        if contended and self.threads > 1:
            left = math.floor(self.cpus - window.others + 0.25)  # CPUs the others leave us
            target, why = max(1, min(self.threads - 1, left)), "contended"
            if self._probing:  # the try failed: the next one waits twice as long
                self._probe_after = min(2 * self._probe_after, PROBE_WINDOWS_MAX)
                why = "the thread tried back waited for a CPU"
            self._calm = self._quiet = 0
            self._probing = False
        elif self.threads < self.max_threads:
            free = self.cpus - window.others - self.threads
            self._calm = self._calm + 1 if free >= FREE_TO_GROW else 0
            self._quiet = self._quiet + 1 if window.waiting < QUIET else 0
            if self._calm >= CALM_WINDOWS:
                target, why = self.threads + 1, "a CPU is free"
            elif self._quiet >= self._probe_after and self._canary is None:
                target, why = self.threads + 1, "trying one back: the busy CPUs do not hold our threads up"
                self._probing = True
            elif self._quiet >= self._probe_after and not self._canary.running:
                self._canary.start()  # its answer comes through canary_result
                self.canary_tests += 1
            if target != self.threads:
                self._calm = self._quiet = 0
        if target != self.threads:
            self._set(
                target,
                f"{why} (our threads waiting for a CPU: {window.waiting:.2f}, other processes busy: "
                f"{window.others:.2f} of {self.cpus} CPUs)",
            )
        return self.threads

    def canary_result(self, waiting: float) -> int:
        """The canary's answer (the fraction of its time it waited for a CPU): below CANARY_BUSY one more
        thread is tried (and judged on the next TRIAL_WINDOW_S of work); else the next test waits twice
        as many quiet windows."""
        self._quiet = 0
        if self.threads >= self.max_threads:  # a thread came back meanwhile (a CPU went free)
            return self.threads
        if waiting < CANARY_BUSY:
            self._probing = True
            self._set(self.threads + 1, f"the canary got a CPU (waited {waiting:.2f} of its time)")
            self._last = self._look = self._read()  # the try's window starts now
        else:
            self._probe_after = min(2 * self._probe_after, PROBE_WINDOWS_MAX)
            log.info(
                "CPU contention governor: %d engine thread(s) kept, the canary waited %.2f of its time (next "
                "test after %d quiet windows)",
                self.threads,
                waiting,
                self._probe_after,
            )
        return self.threads

    def _set(self, target: int, why: str) -> None:
        log.info("CPU contention governor: %d -> %d engine thread(s), %s", self.threads, target, why)
        self.threads = target
        self.changes += 1
        self._calm = self._quiet = 0
        self._apply(target)
