"""What one engine step does, as plain data: the scheduler (scheduler.py) fills a `StepPlan`, the step
runner (step_runner.py) runs it, the booking (booking.py) records what came out.

A prefill chunk is a list of (sequence, prompt tokens this step) in row order. The variants of a step
are fields here, not branches across files:
- inline prefill: `prefill` holds this step's chunk; `packed` runs it and the decoding rows' next tokens
  in one forward (EngineSettings.packed_steps);
- prefill workers: `jobs` holds one chunk per idle worker, each with the decoding rows that ride in it
  (packed steps on the workers), and the engine thread decodes the rest meanwhile;
- `decode`: every decoding row not riding a job decodes on the engine thread, after the inline prefill
  is booked (rows it promoted decode in the same step).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from adapterserve.server.engine.sequence import Sequence

Chunk = list[tuple[Sequence, int]]  # (row's sequence, prompt tokens it prefills now), in row order


@dataclass
class JobPlan:
    chunk: Chunk
    riders: list[Sequence] = field(default_factory=list)  # decoding rows whose next token it computes


@dataclass
class StepPlan:
    prefill: Chunk = field(default_factory=list)  # inline: this step's chunk
    packed: bool = False  # inline: the chunk and the decoding rows in one forward
    jobs: list[JobPlan] = field(default_factory=list)  # for the prefill workers
    decode: bool = False  # the decoding rows not riding a job decode on the engine thread

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.jobs or self.decode)


@dataclass
class PrefillJob:
    """A `JobPlan` submitted to a prefill worker (in flight until the engine thread books it)."""

    chunk: Chunk
    future: Future  # -> logits [B, V]; with riders (decode logits [Bd, V], prefill logits [B, V])
    riders: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        """Every row the job computes for (in flight until it is booked): riders, then the chunk's rows."""
        return self.riders + [seq for seq, _ in self.chunk]
