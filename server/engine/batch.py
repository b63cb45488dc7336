"""The engine's rows: the running sequences, the KV cache rows that hold them, and the prefill jobs in
flight. The scheduler (scheduler.py) decides what they do in a step, the step runner (step_runner.py)
runs it, the booking (booking.py) records the outcome; all three share this one object.

Row order: decoding rows first (0..num_decoding-1), then the rows still prefilling, in the order they
were admitted. Promotion and retirement shift rows (`shift_row`, `close_row`), never swap a newer row
ahead of an older one, so prefill is served in admission order.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field

from adapterserve.server.engine.kv_cache import KVCache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.plan import PrefillJob
from adapterserve.server.engine.sequence import Sequence


@dataclass
class Batch:
    cache: KVCache | PagedKVCache
    running: list[Sequence] = field(default_factory=list)  # index == cache row
    num_decoding: int = 0
    jobs: list[PrefillJob] = field(default_factory=list)  # in flight on the prefill workers, oldest first

    def row_of(self, seq: Sequence) -> int:
        return self.running.index(seq)

    @property
    def decoding(self) -> list[Sequence]:
        return self.running[: self.num_decoding]

    @property
    def prefilling(self) -> list[Sequence]:
        return self.running[self.num_decoding :]

    def free_decoding(self) -> list[Sequence]:
        """Decoding rows not in a job in flight (riders of a packed job are)."""
        return [seq for seq in self.decoding if not seq.in_flight]

    def append(self, seq: Sequence) -> int:
        """`seq` takes the next row (its KV blocks reserved by the caller); returns the row."""
        self.running.append(seq)
        return len(self.running) - 1

    def promote(self, seq: Sequence) -> None:
        """A row whose prefill is complete joins the decoding rows: it moves to the first prefilling
        row's place and the rows still prefilling move one row on, in their order."""
        self.shift_row(self.row_of(seq), self.num_decoding)
        self.num_decoding += 1

    def shift_row(self, src: int, dst: int) -> None:
        """Row src becomes row dst; the rows from dst up to src (src > dst) each move one row on, in the
        same order (a paged cache swaps block-table rows; a dense one copies each row's filled positions)."""
        for row in range(src, dst, -1):
            above, below = self.running[row - 1], self.running[row]
            self.cache.swap_rows(row - 1, row, max(above.length, below.length))
            self.running[row - 1], self.running[row] = below, above

    def close_row(self, row: int) -> Sequence:
        """Free `row` (its cache row already released) and return its sequence. A decoding row's hole is
        filled by the last decoding row (their order does not matter); the rows still prefilling then
        close up behind it, keeping their admission order (moving the newest row into the hole would
        serve it first)."""
        seq = self.running[row]
        hole = row
        if row < self.num_decoding:
            last_decoding = self.num_decoding - 1
            if row != last_decoding:
                self._move(last_decoding, row)
            hole = last_decoding
            self.num_decoding -= 1
        for later in range(hole + 1, len(self.running)):  # close up: each later row one row down
            self._move(later, later - 1)
        self.running.pop()
        return seq

    def _move(self, src: int, dst: int) -> None:
        moved = self.running[src]
        self.cache.move_row(src, dst, moved.length)
        self.running[dst] = moved

    def take_done_jobs(self, wait: bool = False) -> list[PrefillJob]:
        """The jobs that finished (all of them, waiting, when `wait`), taken off the in-flight list; their
        rows are no longer in flight."""
        if wait:
            futures.wait([job.future for job in self.jobs])
        finished = {id(job) for job in self.jobs if job.future.done()}  # looked at once: jobs end meanwhile
        done = [job for job in self.jobs if id(job) in finished]
        self.jobs = [job for job in self.jobs if id(job) not in finished]
        for job in done:
            for seq in job.seqs:
                seq.in_flight = False
        return done
