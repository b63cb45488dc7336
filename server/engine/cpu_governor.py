"""Fewer engine threads while other processes compete for the CPUs; all of them back when they leave.

Why: libgomp's workers spin at every barrier of a parallel region. With the machine to itself that is
what makes a CPU decode step fast; beside a busy process (a load client on the same host, a tokenizer,
a second replica, a CPU quota shared with a sidecar) a worker that lost its core stalls the whole region
and the spinning ones take the core the other process wanted (server/cpu_threads.py). With fewer
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
  windows in a row in which our threads hardly waited, the engine tries one thread back although the
  CPUs look busy: if the next window shows it waiting (`CONTENDED`), it drops again and waits twice as
  many windows before the next try (at most `PROBE_WINDOWS_MAX`; after `NEW_LOAD_IDLE_S` of idle,
  a new load, the tries start over); if not, the thread stays.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

WINDOW_S = 1.0  # seconds of work between two decisions
# CPUs' worth of our threads waiting for a CPU: we are in someone's way (or they in ours). Measured on 2
# cores: beside NVIDIA AIPerf 0.75-1.0, beside a light client (the openai package, 16 threads) 0.27-0.29,
# where the full thread count is as fast (docs/performance.md): the threshold sits between.
CONTENDED = 0.4
FREE_TO_GROW = 0.75  # a CPU this free (after the others and our threads) is worth one more thread
CALM_WINDOWS = 3  # windows in a row with that much free before a thread comes back
QUIET = CONTENDED / 2  # our threads' waiting below this: the CPUs we have are not fought over
PROBE_WINDOWS = 3  # quiet windows in a row before a thread is tried back beside busy CPUs
PROBE_WINDOWS_MAX = 48  # the wait doubles after each failed try, up to this
NEW_LOAD_IDLE_S = 2.0  # idle this long: the load that made tries fail may be gone (tries start over)


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

    def __init__(self, cpus: Sequence[int]):
        self._cpus = {f"cpu{c}" for c in cpus}
        self._hz = _ticks_per_second()

    def _run_delay(self) -> float:
        total = 0
        for path in glob.glob("/proc/self/task/*/schedstat"):
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


@dataclass(frozen=True)
class Window:
    """One window's rates, in CPUs: `waiting` of our threads runnable without a CPU, `others` busy
    with other processes' work on our CPUs."""

    seconds: float
    waiting: float
    others: float


class CpuGovernor:
    """Decides the engine's thread count from the counters; `apply(threads)` sets it (engine thread)."""

    def __init__(
        self,
        max_threads: int,
        cpus: int,
        apply: Callable[[int], None],
        read: Callable[[], CpuSample | None],
        window_s: float = WINDOW_S,
    ) -> None:
        self.max_threads, self.cpus = max_threads, cpus
        self.threads = max_threads
        self.window_s = window_s
        self._apply, self._read = apply, read
        self._last: CpuSample | None = None
        self._calm = 0
        self._quiet = 0  # quiet windows in a row (below max_threads)
        self._probe_after = PROBE_WINDOWS
        self._probing = False  # the last thread added was a try beside busy CPUs
        self._idle_since: float | None = None
        self.changes = 0
        self.last_window: Window | None = None

    def after_step(self) -> None:
        """Call after each engine step: decides once per window of work."""
        now = time.monotonic()
        if self._idle_since is not None:
            if now - self._idle_since >= NEW_LOAD_IDLE_S:
                self._probe_after, self._quiet = PROBE_WINDOWS, 0
            self._idle_since = None
        if self._last is not None and now - self._last.wall < self.window_s:
            return
        sample = self._read()
        if sample is None:
            return
        previous, self._last = self._last, sample
        if previous is None:
            return
        seconds = sample.wall - previous.wall  # idle periods never count: idle() restarts the window
        window = Window(
            seconds=seconds,
            waiting=(sample.run_delay - previous.run_delay) / seconds,
            others=max(0.0, (sample.cpus_busy - previous.cpus_busy) - (sample.own_cpu - previous.own_cpu))
            / seconds,
        )
        self.last_window = window
        log.debug(
            "CPU window %.2f s: threads %d, ours waiting %.2f, others busy %.2f",
            seconds,
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
            elif self._quiet >= self._probe_after:
                target, why = self.threads + 1, "trying one back: the busy CPUs do not hold our threads up"
                self._probing = True
            if target != self.threads:
                self._calm = self._quiet = 0
        if target != self.threads:
            log.info(
                "CPU contention governor: %d -> %d engine thread(s), %s (our threads waiting for a CPU: "
                "%.2f, other processes busy: %.2f of %d CPUs)",
                self.threads,
                target,
                why,
                window.waiting,
                window.others,
                self.cpus,
            )
            self.threads = target
            self.changes += 1
            self._apply(target)
        return self.threads
