"""Peak memory of a block of work: the device's on CUDA, the process's resident set on a CPU.

CUDA: `torch.cuda.max_memory_allocated` (tensors only), reset when the block starts. CPU: the peak
resident set size (RSS) of the process while the block runs, sampled from /proc/self/statm by a
thread every `interval` seconds (Linux), or the process's lifetime peak (`ru_maxrss`) elsewhere. The
CPU figure includes everything resident in the process (the base model, Python, libraries), so
compare runs made in fresh processes (`adapterserve train compare` does).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

_STATM = Path("/proc/self/statm")


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    measure: str  # "cuda_max_allocated", "process_peak_rss" or "process_lifetime_max_rss"


def _rss_bytes() -> int:
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lifetime_max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class PeakMemoryMeter:
    """`with PeakMemoryMeter(device) as meter: ...`; then `meter.result`."""

    def __init__(self, device: torch.device, *, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.result: PeakMemory | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> PeakMemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _STATM.exists():
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = PeakMemory(int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated")
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.result = PeakMemory(self._peak, "process_peak_rss")
        else:
            self.result = PeakMemory(_lifetime_max_rss(), "process_lifetime_max_rss")
