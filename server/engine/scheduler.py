"""The scheduler: which waiting requests get rows, and what each row does this step (a `StepPlan`).

- `admit`: waiting requests take free rows, first come first served, bounded by the batch size, the KV
  blocks and the adapter slots. A request for an adapter that finds every device slot busy lets requests
  for resident adapters pass, at most max_batch_size of them; then admission is FIFO until a slot frees
  for it. One admission's requests start shortest prefill first (prefill_groups.py);
- `place`: an admitted request takes the next row and the blocks of its prompt's longest cached prefix
  (prefix_cache.py), and reserves the rest of its KV blocks;
- `plan`: this step's prompt tokens, over the prefilling rows in row order (admission order) within the
  token budget, so a request waits only for the prefill of those admitted before it; inline they are one
  chunk (packed with the decode rows when EngineSettings.packed_steps), with prefill workers one chunk
  per idle worker. Every step also decodes, so neither prefill nor decode starves the other.
"""

from __future__ import annotations

import time

from adapterserve.server.adapters.slots import AdapterBank
from adapterserve.server.engine import prefix_cache
from adapterserve.server.engine.batch import Batch
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.plan import Chunk, JobPlan, StepPlan
from adapterserve.server.engine.prefill_groups import prefill_length
from adapterserve.server.engine.request_queue import RequestQueue
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.stats import EngineCounters
from adapterserve.server.settings import EngineSettings

# prefill jobs per worker: a worker that finishes one starts the next at once, not when the engine
# thread's decode step ends and books the finished one
JOBS_PER_WORKER = 2


class Scheduler:
    def __init__(
        self,
        batch: Batch,
        queue: RequestQueue,
        bank: AdapterBank,
        settings: EngineSettings,
        counters: EngineCounters,
        rides: bool,
    ):
        self.batch, self.queue, self.bank, self.settings = batch, queue, bank, settings
        self.counters = counters
        self.rides = rides  # decoding rows ride in prefill jobs (packed steps on the workers)

    # ----- admission ---------------------------------------------------------------------------------
    def admit(self) -> list[Sequence]:
        """Waiting requests admitted into free rows (their adapter slots acquired), shortest prefill first."""
        batch, cache = self.batch, self.batch.cache
        # rows and KV tokens promised to the choices of running requests not forked yet (fork.py)
        promised = [c.kv_tokens for s in batch.running for c in s.pending_choices]
        free_rows = self.settings.max_batch_size - len(batch.running) - len(promised)
        admitted: list[Sequence] = []
        slots_full = False  # once a new adapter found no slot, only resident ones can be admitted
        with self.queue.lock:
            waiting = self.queue.waiting
            skipped: list[Sequence] = []
            reserving: list[int] = list(promised)  # KV tokens of each row admitted in this call (+ promised)
            while waiting and len(reserving) - len(promised) + waiting[0].request.n <= free_rows:
                head = waiting[0]
                if not cache.can_reserve([*reserving, *[head.kv_tokens] * head.request.n]):
                    break  # FIFO: wait for running requests to free KV blocks
                seq = waiting.popleft()
                key = seq.slot_key
                if key is not None and seq.resolved is not None:
                    resident = self.bank.table.lookup(key) is not None
                    slot = (
                        None if slots_full and not resident else self.bank.acquire(key, seq.resolved.adapter)
                    )
                    if slot is None:  # every slot busy: wait, but let requests behind it use resident ones
                        slots_full = True
                        skipped.append(seq)
                        if seq.overtaken >= self.settings.max_batch_size:
                            break  # it has let enough pass: FIFO until a slot frees for it
                        continue
                    seq.slot = slot
                for held in skipped:
                    held.overtaken += 1
                admitted.append(seq)
                reserving += [seq.kv_tokens] * seq.request.n
            waiting.extendleft(reversed(skipped))
        now = time.monotonic()
        for seq in admitted:
            seq.admitted_at = now
        return sorted(admitted, key=prefill_length)

    def place(self, seq: Sequence) -> int:
        """`seq` takes the next row with the blocks of its prompt's longest cached prefix; returns the row."""
        cache = self.batch.cache
        block_size = cache.block_size  # 0: a dense cache, no blocks to share
        cached: list[int] = []
        if block_size:
            lookup = prefix_cache.lookup_blocks(seq, block_size, self.settings.prefix_cache)
            tokens = prefix_cache.chain_tokens(seq)
            cached = cache.match(prefix_cache.extend_keys(seq, tokens, lookup, block_size))
            if self.settings.prefix_cache and not seq.scores_prompt:
                self.counters.prefix_cache_queries += len(tokens)
                self.counters.prefix_cache_hits += len(cached) * block_size
        row = len(self.batch.running)
        cache.reserve(row, seq.kv_tokens, cached)
        return self.batch.append(seq)  # on failure, the step's guard finishes it and retire frees the row

    # ----- the step's work ---------------------------------------------------------------------------
    def plan(self, workers: int) -> StepPlan:
        """This step's work: with `workers` prefill workers, a job per idle worker (the engine thread
        decodes meanwhile); without, one chunk inline, then the decode."""
        if workers:
            return StepPlan(jobs=self._jobs(workers), decode=True)
        chunk = self._next_chunk()
        packed = bool(chunk) and self.batch.num_decoding > 0 and self._can_pack(chunk)
        return StepPlan(prefill=chunk, packed=packed, decode=not packed)

    def chunk_budget(self) -> int:
        """Prompt tokens a prefill forward holds: `max_prefill_tokens`, or with packed steps while rows
        decode `packed_chunk_tokens` (the rows riding in a forward wait for all of it for their next token)."""
        budget = self.settings.max_prefill_tokens
        if self.settings.packed_steps and self.batch.num_decoding:
            budget = min(budget, self.settings.packed_chunk_tokens)
        return budget

    def _next_chunk(self) -> Chunk:
        """Prefilling rows in row order while the token budget lasts. The first prefilling row always gets
        some tokens, so a long prompt cannot starve. A row whose prompt would leave a tail of at most 1/8
        of the budget takes it now (the step runs up to 1/8 over budget): a tail left for the next step is
        a forward of its own that reads every weight for a few tokens."""
        budget = self.chunk_budget()
        tail = budget // 8
        chunk: Chunk = []
        for seq in self.batch.prefilling:
            take = _take(seq, budget, tail)
            if take <= 0:
                break
            chunk.append((seq, take))
            budget -= take
        _started(chunk)
        return chunk

    def _jobs(self, workers: int) -> list[JobPlan]:
        """A job for each idle worker: prefilling rows not in flight, in row order, split so that the idle
        workers share this step's tokens (each job within `chunk_budget`; a long prompt is chunked). Where
        decoding rows ride, the first job that can carry them takes every one not in flight, and a worker
        takes one job at a time (the riders start now, not behind a queued job)."""
        idle = (1 if self.rides else JOBS_PER_WORKER) * workers - len(self.batch.jobs)
        pending = [seq for seq in self.batch.prefilling if not seq.in_flight and seq.prefill_remaining]
        if idle <= 0 or not pending:
            return []
        budget = self.chunk_budget()
        takes = [_take(seq, budget, budget // 8) for seq in pending]
        share = min(budget, -(-sum(takes) // idle))  # tokens per job, the idle workers sharing them
        chunks: list[Chunk] = [[]]
        tokens = 0
        for seq, take in zip(pending, takes, strict=True):
            if chunks[-1] and tokens + take > share:
                if len(chunks) == idle:
                    break  # the rest waits for a worker
                chunks.append([])
                tokens = 0
            chunks[-1].append((seq, take))
            tokens += take
        riders = self.batch.free_decoding() if self.rides else []
        jobs = []
        for chunk in chunks:
            carry = riders if riders and self._can_pack(chunk) else []
            if carry:
                riders = []
            jobs.append(JobPlan(chunk, carry))
            _started(chunk)
        return jobs

    def _can_pack(self, chunk: Chunk) -> bool:
        """Whether a prefill chunk and decode rows run as one forward (see runner.packed)."""
        return (
            self.settings.packed_steps
            and isinstance(self.batch.cache, PagedKVCache)
            and not any(seq.scores_prompt for seq, _ in chunk)
        )


def _take(seq: Sequence, budget: int, tail: int) -> int:
    """The row's prompt tokens within `budget`, or all of them when at most `tail` would be left over."""
    take = min(seq.prefill_remaining, budget)
    return seq.prefill_remaining if 0 < take and seq.prefill_remaining - take <= tail else take


def _started(chunk: Chunk) -> None:
    """Its rows' prefill has started (their queue wait ends: Sequence.queue_wait)."""
    now = time.monotonic()
    for seq, _ in chunk:
        if seq.prefill_started_at is None:
            seq.prefill_started_at = now
