"""The prefill phase of an engine step (functions of the EngineCore, as fork.py's are).

- `start`: admitted requests get rows at the end of the batch, shortest prefill first, and their prefill
  inputs (a prefix adapter's K/V written now, a prompt adapter's virtual tokens in front);
- `next_chunk`: this step's prompt tokens, over the prefilling rows in order (their admission order,
  core.EngineCore keeps it) within the token budget;
- `run`: the chunk's forwards (rows grouped by length; scoring rows keep every position's state);
  `run_packed`: the chunk and the decoding rows in one forward (EngineSettings.packed_steps);
  `launch` / `done_jobs` / `book`: the same forwards as jobs on prefill worker threads (a CPU engine,
  prefill_workers.py) while the engine thread decodes; booked by the engine thread when done; with
  packed_steps the decoding rows ride in the next job launched (one forward for their next token and the
  chunk, on the worker); rows not in a job decode on the engine thread;
- a row whose prompt is complete samples its first token (its n choices fork from it, fork.py) and
  joins the decoding rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.adapters.layers import AdapterBatch, build_batch
from adapterserve.server.engine import prefix_cache
from adapterserve.server.engine.fork import fork
from adapterserve.server.engine.logits_processing import prompt_token_logprobs
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.prefill_groups import plan_groups, prefill_length
from adapterserve.server.engine.runner import PrefillRow
from adapterserve.server.engine.scoring import chunk_logprobs, scored_positions
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.types import FinishReason

if TYPE_CHECKING:
    from adapterserve.server.engine.core import EngineCore


def start(core: EngineCore, seqs: list[Sequence]) -> None:
    """Give admitted requests rows at the end, shortest prefill first (see prefill_groups.py), the blocks
    of their prompt's longest cached prefix (prefix_cache.py) and their prefill inputs (prefix K/V
    written now, past what the cached blocks hold)."""
    block_size = core.cache.block_size  # 0: a dense cache, no blocks to share
    for seq in sorted(seqs, key=prefill_length):
        row = len(core.running)
        cached: list[int] = []
        if block_size:
            lookup = prefix_cache.lookup_blocks(seq, block_size, core.settings.prefix_cache)
            tokens = prefix_cache.chain_tokens(seq)
            cached = core.cache.match(prefix_cache.extend_keys(seq, tokens, lookup, block_size))
            if core.settings.prefix_cache and not seq.scores_prompt:
                core.prefix_cache_queries += len(tokens)
                core.prefix_cache_hits += len(cached) * block_size
        core.cache.reserve(row, seq.kv_tokens, cached)
        core.running.append(seq)  # on failure, run_guarded finishes it and retire frees the row
        ids = torch.tensor(seq.request.prompt_ids, dtype=torch.long, device=core.device)
        embeds = core.runner.embed(ids)  # [n, H]
        if seq.hook == HookSite.PREFILL:
            assert seq.resolved is not None
            storage = core.bank.prefill[seq.resolved.adapter.kind]
            embeds, seq.prefill_start = storage.prefill(seq.slot, row, embeds, core.cache)  # [m, H]
        seq.prefill_inputs = embeds
        # positions taken computed: the prefill starts after them (the last prompt position never is)
        seq.prefill_done = max(0, core.cache.cached_tokens(row) - seq.prefill_start)
        seq.length = seq.prefill_start + seq.prefill_done
        register_blocks(core, seq, row)


def register_blocks(core: EngineCore, seq: Sequence, row: int, with_output: bool = False) -> None:
    """Key `seq`'s full blocks whose positions are computed (its length), so later requests take them
    (prefix_cache.py); with prefix caching off only a prefix-tuning prefix's whole blocks."""
    block_size = core.cache.block_size
    if not block_size:
        return
    if core.settings.prefix_cache:
        tokens = prefix_cache.chain_tokens(seq, with_output)
        blocks = min(seq.length, len(tokens)) // block_size
    else:
        tokens = prefix_cache.chain_tokens(seq)
        blocks = prefix_cache.lookup_blocks(seq, block_size, prompts=False)
        blocks = min(blocks, seq.length // block_size)
    if blocks:
        core.cache.register(row, prefix_cache.extend_keys(seq, tokens, blocks, block_size))


def chunk_budget(core: EngineCore) -> int:
    """Prompt tokens a prefill forward holds: `max_prefill_tokens`, or with packed steps while rows decode
    `packed_chunk_tokens` (the rows riding in a forward wait for all of it for their next token)."""
    budget = core.settings.max_prefill_tokens
    if core.settings.packed_steps and core.num_decoding:
        budget = min(budget, core.settings.packed_chunk_tokens)
    return budget


def next_chunk(core: EngineCore) -> list[tuple[Sequence, int]]:
    """(row, tokens) for this step: prefilling rows in row order while the token budget lasts.
    The first prefilling row always gets some tokens, so a long prompt cannot starve. A row whose prompt
    would leave a tail of at most 1/8 of the budget takes it now (the step runs up to 1/8 over budget):
    a tail left for the next step is a forward of its own that reads every weight for a few tokens (a
    prompt-tuning row's 8 virtual tokens past a 512-token budget of 128-token prompts did that)."""
    budget = chunk_budget(core)
    tail = budget // 8
    chunk: list[tuple[Sequence, int]] = []
    for seq in core.running[core.num_decoding :]:
        take = _take(seq, budget, tail)
        if take <= 0:
            break
        chunk.append((seq, take))
        budget -= take
    _started(chunk)
    return chunk


def _started(chunk: list[tuple[Sequence, int]]) -> None:
    """Its rows' prefill has started (their queue wait ends: Sequence.queue_wait)."""
    now = time.monotonic()
    for seq, _ in chunk:
        if seq.prefill_started_at is None:
            seq.prefill_started_at = now


def _take(seq: Sequence, budget: int, tail: int) -> int:
    """The row's prompt tokens within `budget`, or all of them when at most `tail` would be left over."""
    take = min(seq.prefill_remaining, budget)
    return seq.prefill_remaining if 0 < take and seq.prefill_remaining - take <= tail else take


def can_pack(core: EngineCore, chunk: list[tuple[Sequence, int]]) -> bool:
    """Whether a prefill chunk and decode rows run as one forward (see runner.packed)."""
    return (
        core.settings.packed_steps
        and isinstance(core.cache, PagedKVCache)
        and not any(seq.scores_prompt for seq, _ in chunk)
    )


def _rows(core: EngineCore, chunk: list[tuple[Sequence, int]]) -> list[PrefillRow]:
    rows = []
    for seq, take in chunk:
        assert seq.prefill_inputs is not None
        part = seq.prefill_inputs[seq.prefill_done : seq.prefill_done + take]
        rows.append(PrefillRow(embeds=part, start=seq.prefill_start + seq.prefill_done))
    return rows


def run_packed(core: EngineCore, chunk: list[tuple[Sequence, int]]) -> None:
    """Decode every decoding row and prefill one chunk of each chosen prefilling row in one forward."""
    decoding = core.running[: core.num_decoding]
    table = core.cache.table[: core.num_decoding + len(chunk)]  # [Bd + Bp, nb]: the chunk follows them
    decode_logits, prefill_logits = _packed_forward(core, decoding, chunk, table)()
    _book_riders(core, decoding, decode_logits)
    _prefilled(core, chunk, prefill_logits)


def _packed_forward(
    core: EngineCore, decoding: list[Sequence], chunk: list[tuple[Sequence, int]], table: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The packed forward of `decoding` rows' next tokens and `chunk`, prepared on the engine thread;
    calling it (there, or on a prefill worker) returns (decode logits [Bd, V], prefill logits [Bp, V])."""
    slots = [s.slot for s in decoding] + [seq.slot for seq, take in chunk for _ in range(take)]
    tokens, positions = [s.output[-1] for s in decoding], [s.length for s in decoding]
    rows, batch = _rows(core, chunk), build_batch(slots, core.bank.slot_kinds, core.device)
    return lambda: core.runner.packed(tokens, positions, rows, table, batch)


def _book_riders(core: EngineCore, decoding: list[Sequence], logits: torch.Tensor) -> None:
    """The decode rows of a packed forward take their tokens (logits [Bd, V])."""
    for seq in decoding:
        seq.length += 1
    core.accept_tokens(decoding, logits)


def run(core: EngineCore, chunk: list[tuple[Sequence, int]]) -> None:
    """Run one chunk of each chosen prefilling row (contiguous rows from num_decoding)."""
    _prefilled(core, chunk, plan_forward(core, chunk, table=None).logits())


@dataclass
class ChunkForward:
    """A prefill chunk's forward, prepared on the engine thread: `logits()` runs it (there, or on a
    prefill worker) and touches only these rows' KV blocks, inputs and (scoring rows) score lists."""

    core: EngineCore
    chunk: list[tuple[Sequence, int]]
    rows: list[PrefillRow]
    groups: list[tuple[int, int]]  # contiguous row groups, one forward each (prefill_groups.py)
    batches: list[AdapterBatch]  # each group's adapter rows
    row_start: int  # the chunk's first cache row (used when table is None)
    table: torch.Tensor | None  # [B, nb] a copy of the rows' block tables: rows may move meanwhile

    def logits(self) -> torch.Tensor:
        """Each row's last-position logits [B, V] (its cache filled for the chunk's positions)."""
        if any(seq.scores_prompt for seq, _ in self.chunk):
            return _scoring_logits(self)
        table = self.table
        return torch.cat(
            [
                self.core.runner.prefill(
                    self.rows[a:b], self.row_start + a, batch, None if table is None else table[a:b]
                )
                for (a, b), batch in zip(self.groups, self.batches, strict=True)
            ]
        )  # [B, V]


def plan_forward(
    core: EngineCore, chunk: list[tuple[Sequence, int]], table: torch.Tensor | None
) -> ChunkForward:
    """The forward of `chunk` (rows in order), grouped by length unless it scores (then one group)."""
    seqs = [seq for seq, _ in chunk]
    if any(seq.scores_prompt for seq in seqs):
        groups = [(0, len(chunk))]
    else:  # groups of similar lengths, each padded to its own longest row only
        groups = plan_groups([take for _, take in chunk], core.prefill_forward_cost, core.prefill_positions)
    return ChunkForward(
        core=core,
        chunk=chunk,
        rows=_rows(core, chunk),
        groups=groups,
        batches=[core.adapter_batch(seqs[a:b]) for a, b in groups],
        row_start=core.num_decoding,
        table=table,
    )


# ----- prefill on worker threads (prefill_workers.py): the engine thread decodes meanwhile ----------
JOBS_PER_WORKER = 2


@dataclass
class PrefillJob:
    chunk: list[tuple[Sequence, int]]
    future: Future  # -> logits [B, V]; with riders (decode logits [Bd, V], prefill logits [B, V])
    riders: list[Sequence] = field(default_factory=list)  # decoding rows whose next token it computes

    @property
    def seqs(self) -> list[Sequence]:
        """Every row the job computes for (in flight until it is booked): riders, then the chunk's rows."""
        return self.riders + [seq for seq, _ in self.chunk]


def rides(core: EngineCore) -> bool:
    """Whether decoding rows ride in prefill jobs (packed steps on prefill workers; the eager decode step,
    which addresses rows through their block tables when some are riding)."""
    return core.settings.packed_steps and isinstance(core.cache, PagedKVCache) and core.decode_graphs is None


def free_decoding(core: EngineCore) -> list[Sequence]:
    """Decoding rows not in a job in flight."""
    return [seq for seq in core.running[: core.num_decoding] if not seq.in_flight]


def launch(core: EngineCore) -> None:
    """Give each idle worker a job: prefilling rows not in flight, in row order, split so that the idle
    workers share this step's tokens (each job within `chunk_budget`; a long prompt is chunked). Where
    decoding rows ride (packed steps), the first job that can carry them takes every one not in flight."""
    assert core.workers is not None
    riding = rides(core)
    # up to JOBS_PER_WORKER jobs each: a worker that finishes one starts the next at once, not when the
    # engine thread's decode step ends and it books the finished one. Riding: one each, so that the rows
    # riding a job start now, not behind a queued job
    idle = (1 if riding else JOBS_PER_WORKER) * core.workers.count - len(core.prefill_jobs)
    pending = [
        seq for seq in core.running[core.num_decoding :] if not seq.in_flight and seq.prefill_remaining
    ]
    if idle <= 0 or not pending:
        return
    budget = chunk_budget(core)
    takes = [_take(seq, budget, budget // 8) for seq in pending]
    share = min(budget, -(-sum(takes) // idle))  # tokens per job, the idle workers sharing them
    jobs: list[list[tuple[Sequence, int]]] = [[]]
    tokens = 0
    for seq, take in zip(pending, takes, strict=True):
        if jobs[-1] and tokens + take > share:
            if len(jobs) == idle:
                break  # the rest waits for a worker
            jobs.append([])
            tokens = 0
        jobs[-1].append((seq, take))
        tokens += take
    riders = free_decoding(core) if riding else []
    for chunk in jobs:
        carry = riders if riders and can_pack(core, chunk) else []
        seqs = carry + [seq for seq, _ in chunk]
        table = core.cache.table[[core.running.index(seq) for seq in seqs]].clone()  # [Bd + B, nb]: the
        # worker's view of the rows' blocks
        if carry:
            run: Callable[[], object] = _packed_forward(core, carry, chunk, table)
            riders = []
        else:
            run = plan_forward(core, chunk, table).logits
        for seq in seqs:
            seq.in_flight = True
        _started(chunk)
        core.prefill_jobs.append(PrefillJob(chunk, core.workers.submit(run), carry))


def done_jobs(core: EngineCore, wait: bool = False) -> list[PrefillJob]:
    """The jobs that finished (all of them, waiting, when `wait`), taken off the in-flight list; their
    rows are no longer in flight."""
    if wait:
        futures.wait([job.future for job in core.prefill_jobs])
    done = [job for job in core.prefill_jobs if job.future.done()]
    core.prefill_jobs = [job for job in core.prefill_jobs if not job.future.done()]
    for job in done:
        for seq in job.seqs:
            seq.in_flight = False
    return done


def book(core: EngineCore, job: PrefillJob) -> None:
    """Book a finished job on the engine thread: its riders take their next tokens, its rows their first
    (rows cancelled while it ran are skipped: they retire). A job that raised re-raises here
    (core.run_guarded fails its rows)."""
    if job.riders:
        decode_logits, logits = job.future.result()  # [Bd, V], [B, V]
        _book_riders(core, job.riders, decode_logits)
    else:
        logits = job.future.result()  # [B, V]
    live = [i for i, (seq, _) in enumerate(job.chunk) if not seq.finished]
    if live:
        _prefilled(core, [job.chunk[i] for i in live], logits[live])


def _prefilled(core: EngineCore, chunk: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
    """Book a prefill chunk that ran (logits [B, V] of each row's last position): rows whose prompt
    is complete sample their first token and join the decoding rows."""
    seqs = [seq for seq, _ in chunk]
    complete: list[int] = []
    for i, (seq, take) in enumerate(chunk):
        seq.prefill_done += take
        seq.length = seq.prefill_start + seq.prefill_done
        register_blocks(core, seq, core.running.index(seq))
        if seq.prefill_remaining == 0:
            seq.prefill_inputs = None
            core.prefilled_prompts += 1
            if seq.request.score_tokens:
                scores = seq.scores
                if seq.request.prompt_logprobs is not None:  # scored as prompt logprobs
                    scores = [t.logprob for t in seq.prompt_scores[-seq.request.score_tokens :]]
                core.finish(
                    seq,
                    FinishReason.SCORED,
                    logprobs=tuple(scores),
                    prompt_logprobs=tuple(seq.prompt_scores),
                )
            else:
                complete.append(i)
    if complete:
        accepting: list[Sequence] = []
        rows: list[int] = []
        for i in complete:
            for s in [seqs[i], *(fork(core, seqs[i]) if seqs[i].pending_choices else [])]:
                accepting.append(s)
                rows.append(i)  # a request's choices all sample from its last-position logits
        core.accept_tokens(accepting, logits[rows])
        for s in accepting:
            if not s.finished:
                _promote(core, s)


def _scoring_logits(forward: ChunkForward) -> torch.Tensor:
    """A prefill chunk with scoring rows: keep every position's state, record the scored tokens'
    log-probs (see scoring.py). Returns each row's last-position logits [B, V], as prefill does."""
    core, chunk = forward.core, forward.chunk
    states = core.runner.prefill_states(
        forward.rows, forward.row_start, forward.batches[0], forward.table
    )  # [B, S, H]
    last = torch.tensor([take - 1 for _, take in chunk], device=states.device)
    for i, (seq, take) in enumerate(chunk):
        if seq.request.prompt_logprobs is not None:
            _prompt_logprobs(core, seq, states[i, :take])
        elif seq.request.score_tokens:
            assert seq.prefill_inputs is not None  # still prefilling
            # virtual token embeddings in front of the prompt (prompt tuning), whatever the kind
            virtual_inputs = seq.prefill_inputs.shape[0] - len(seq.request.prompt_ids)
            seq.scores += chunk_logprobs(
                core.runner.head,
                states[i, :take],
                seq.prefill_done,
                virtual_inputs,
                seq.request.prompt_ids,
                seq.request.score_tokens,
            )
    return core.runner.head(states[torch.arange(len(chunk), device=states.device), last])


def _prompt_logprobs(core: EngineCore, seq: Sequence, states: torch.Tensor) -> None:
    """Record the logprobs (and top-k) of the prompt tokens this chunk's states [take, H] predict."""
    assert seq.prefill_inputs is not None and seq.request.prompt_logprobs is not None
    prompt = seq.request.prompt_ids
    virtual_inputs = seq.prefill_inputs.shape[0] - len(prompt)
    positions = scored_positions(
        seq.prefill_done, states.shape[0], virtual_inputs, len(prompt), len(prompt) - 1
    )
    if not positions:
        return
    index = torch.arange(
        positions.start - seq.prefill_done, positions.stop - seq.prefill_done, device=states.device
    )
    ids = [prompt[p - virtual_inputs + 1] for p in positions]
    seq.prompt_scores += prompt_token_logprobs(
        core.runner.head(states[index]), ids, seq.request.prompt_logprobs
    )


def _promote(core: EngineCore, seq: Sequence) -> None:
    """A row whose prefill is complete joins the decoding rows: it moves to the first prefilling row's
    place and the rows still prefilling move one row on, in their order (core.shift_row)."""
    core.shift_row(core.running.index(seq), core.num_decoding)
    core.num_decoding += 1
