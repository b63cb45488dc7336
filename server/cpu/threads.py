"""The server's CPU threading, chosen by the server: intra-op threads and the OpenMP wait policy.

Torch's CPU kernels run on OpenMP (libgomp in the PyPI wheels). Two choices decide how a CPU engine
behaves when it is not alone on the machine:
- threads: torch defaults to the host's core count. Under a cgroup quota (containers) that is too many:
  the threads spin at barriers while the kernel throttles them. `cpu_budget()` finds what the process
  may really use (affinity mask, cgroup quota), and that is the default.
- wait policy: between parallel regions libgomp's workers spin (a few hundred microseconds by default)
  before they sleep. On a quiet machine that spinning is what makes a decode step's hundreds of small
  parallel regions fast; beside another busy process (a load client, a tokenizer, a sidecar) the
  spinning threads take the cores the other process needs, and a worker that lost its core stalls
  every barrier: measured on 2 cores under NVIDIA AIPerf, throughput halved.
  libgomp reads its policy once, when torch loads it; it cannot change later.

The default (`wait_policy="auto"`) keeps libgomp's spin-then-sleep (the quiet machine's speed) and lets
the engine's governor (server/cpu/governor.py) lower the thread count while other processes
compete for the CPUs, which removes the spinning where it hurts: one thread has no barriers. `passive`
and `active` set OMP_WAIT_POLICY for users who know their machine. `apply_wait_policy` must run before
torch is imported (the `serve` command does so); afterwards only the thread count can still change.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal

from adapterserve.server.cpu.budget import CpuBudget, cpu_budget

log = logging.getLogger(__name__)

WaitPolicy = Literal["auto", "active", "passive"]
_OMP_POLICY = {"active": "ACTIVE", "passive": "PASSIVE"}


@dataclass(frozen=True)
class ThreadPlan:
    """threads: the engine's intra-op threads; source: where that number came from; wait_policy: as
    asked; governed: the run-time governor may lower the threads under contention; prefill_threads:
    worker threads that run prefill forwards beside the decoding engine thread, one intra-op thread
    each (server/cpu/prefill_workers.py; 0: prefill inline, over `threads` OpenMP threads)."""

    threads: int
    source: str
    wait_policy: WaitPolicy
    governed: bool
    budget: CpuBudget
    prefill_threads: int = 0

    def describe(self) -> str:
        policy = {
            "auto": "libgomp default (spin, then sleep)",
            "active": "OMP_WAIT_POLICY=ACTIVE",
            "passive": "OMP_WAIT_POLICY=PASSIVE",
        }[self.wait_policy]
        governor = "on" if self.governed else "off"
        if self.prefill_threads:
            layout = (
                f"CPU threads: {self.threads} ({self.source}); prefill on {self.prefill_threads} worker "
                "thread(s) of one intra-op thread each, beside the decode steps (on "
                f"{max(1, self.threads - self.prefill_threads)} thread(s) while a prefill runs, else up to "
                f"{self.threads}); contention governor (decode steps alone): {governor}"
            )
        else:
            layout = f"CPU threads: {self.threads} ({self.source}), prefill inline; contention governor: {governor}"
        return f"{layout}; wait policy: {policy}; {self.budget.describe()}"


def plan_threads(
    threads: int | None,
    wait_policy: WaitPolicy,
    governor: bool,
    environ: dict[str, str] | None = None,
    budget: CpuBudget | None = None,
    prefill_threads: int | None = None,
) -> ThreadPlan:
    """The thread count: `threads` if set, else OMP_NUM_THREADS if the environment sets it, else the
    usable CPUs. An explicit count is the user's decision: the governor only runs on a chosen default.
    Prefill workers: `prefill_threads` if set, else half the threads (the decode steps beside them get the
    other half; with one CPU a worker would only share it with the decode steps: prefill stays inline)."""
    env = os.environ if environ is None else environ
    budget = budget or cpu_budget()
    omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if threads is not None:
        count, source, governed = threads, "--cpu-threads", False
    elif omp.isdigit() and int(omp) > 0:
        count, source, governed = int(omp), "OMP_NUM_THREADS", False
    else:
        count, source, governed = budget.usable, "usable CPUs", governor
    workers = prefill_threads if prefill_threads is not None else count // 2
    return ThreadPlan(count, source, wait_policy, governed, budget, prefill_threads=workers)


def apply_wait_policy(wait_policy: WaitPolicy, environ: dict[str, str] | None = None) -> bool:
    """Set OMP_WAIT_POLICY for `wait_policy` (nothing for auto) before torch loads libgomp. Returns
    False (and logs) when torch is already imported, so the policy cannot apply any more."""
    policy = _OMP_POLICY.get(wait_policy)
    if policy is None:
        return True
    env = os.environ if environ is None else environ
    env["OMP_WAIT_POLICY"] = policy
    if "torch" in sys.modules:
        log.warning("torch was imported before the CPU settings: OMP_WAIT_POLICY=%s does not apply", policy)
        return False
    return True


def apply_threads(threads: int) -> None:
    """The calling thread's intra-op thread count (OpenMP's is per thread: call it on the engine thread)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
