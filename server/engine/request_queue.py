"""What other threads hand the engine thread: waiting requests, cancellations and control calls (pins,
adapter updates: they write device slots, so they run between two steps). Guarded by one lock; the engine
thread takes them at the start of a step."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.errors import InvalidArgumentError, QueueFullError


class RequestQueue:
    def __init__(self, max_queue: int, activity: threading.Event):
        self.max_queue = max_queue
        self.activity = activity  # set by new work: wakes a waiting step
        self.lock = threading.Lock()  # guards the three below
        self.waiting: deque[Sequence] = deque()
        self.cancelled: set[str] = set()
        self.controls: deque[tuple[Callable[[], object], Future]] = deque()

    def add(self, seq: Sequence) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests); retry later")
            self.waiting.append(seq)
        self.activity.set()

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue several sequences at once, all or none (a request with a list of prompts)."""
        if len(seqs) > self.max_queue:
            raise InvalidArgumentError(
                f"prompt: {len(seqs)} prompts, more than the engine's waiting queue holds "
                f"({self.max_queue}; the server's --max-queue flag raises it)"
            )
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(
                    f"the waiting queue has no room for {len(seqs)} prompts ({len(self.waiting)} of "
                    f"{self.max_queue} requests waiting); retry later"
                )
            self.waiting.extend(seqs)
        self.activity.set()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancelled.add(request_id)
        self.activity.set()

    def call(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self.lock:
            self.controls.append((fn, future))
        self.activity.set()
        return future

    def take_controls(self) -> list[tuple[Callable[[], object], Future]]:
        with self.lock:
            controls, self.controls = list(self.controls), deque()
        return controls

    def take_cancelled(self) -> tuple[set[str], list[Sequence]]:
        """The request ids cancelled since the last call, and their sequences taken off the queue."""
        with self.lock:
            cancel, self.cancelled = self.cancelled, set()
            if not cancel:
                return cancel, []
            kept: deque[Sequence] = deque()
            dropped = []
            for seq in self.waiting:
                (dropped if seq.request.request_id in cancel else kept).append(seq)
            self.waiting = kept
        return cancel, dropped

    def take_all(self) -> list[Sequence]:
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        return waiting

    def busy(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.cancelled or self.controls)
