"""A dependency-free progress bar for uploads, used by the CLI (any `UploadProgress` callback fits)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from adapterserve.upload import UploadProgress


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressBar:
    """Draws `[#####.....]  45%  1.2/2.6 MiB` on one line, redrawn at most every `min_interval` s.

    On a terminal the line is rewritten in place (carriage return); elsewhere (a pipe, a log file) only
    the final line is written, so logs are not flooded. Call `close()` (or use it as a context manager)
    to end the line.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30, min_interval: float = 0.1) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self._min_interval = min_interval
        self._last_draw = 0.0
        self._last: UploadProgress | None = None
        self._interactive = bool(getattr(self._stream, "isatty", lambda: False)())

    def render(self, p: UploadProgress) -> str:
        filled = int(round(self._width * p.fraction))
        bar = "#" * filled + "." * (self._width - filled)
        return f"[{bar}] {p.fraction * 100:5.1f}%  {format_bytes(p.sent_bytes)}/{format_bytes(p.total_bytes)}"

    def __call__(self, p: UploadProgress) -> None:
        self._last = p
        now = time.monotonic()
        done = p.sent_bytes >= p.total_bytes
        if self._interactive and (done or now - self._last_draw >= self._min_interval):
            self._stream.write("\r" + self.render(p))
            self._stream.flush()
            self._last_draw = now

    def close(self) -> None:
        if self._last is None:
            return
        if self._interactive:
            self._stream.write("\r" + self.render(self._last) + "\n")
        else:
            self._stream.write(self.render(self._last) + "\n")
        self._stream.flush()
        self._last = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
