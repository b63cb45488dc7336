"""The step runner: runs what the scheduler planned (plan.py) as forwards over the model (runner.py) and
hands back logits; the booking (booking.py) turns them into tokens. It never decides who runs.

- `prepare`: a placed request's prefill inputs (its prompt's embeddings, a prompt-tuning adapter's virtual
  tokens in front, a prefix-tuning adapter's key/value prefix written into its blocks now);
- `prefill`: a chunk's forwards (rows grouped by length; scoring rows keep every position's state and
  record their scores); `packed`: a chunk and the decoding rows' next tokens in one forward;
- `decode`: one token's logits for decoding rows (the CUDA-graph / static step, or eager);
- `submit`: a job's forward on a prefill worker thread (cpu/prefill_workers.py), over a copy of its rows'
  block tables (rows may be renumbered while it runs); its rows are in flight until booked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.adapters.layers import AdapterBatch, build_batch
from adapterserve.server.adapters.slots import AdapterBank
from adapterserve.server.cpu.decode_pacing import DecodePacer
from adapterserve.server.cpu.governor import MeteredWork
from adapterserve.server.cpu.omp_pools import set_thread_threads
from adapterserve.server.cpu.prefill_workers import PrefillWorkers
from adapterserve.server.engine import prefix_cache
from adapterserve.server.engine.batch import Batch
from adapterserve.server.engine.decode_graphs import DecodeGraphs
from adapterserve.server.engine.logits_processing import prompt_token_logprobs
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.plan import Chunk, JobPlan, PrefillJob
from adapterserve.server.engine.prefill_groups import plan_groups
from adapterserve.server.engine.runner import ModelRunner, PrefillRow
from adapterserve.server.engine.scoring import chunk_logprobs, scored_positions
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.settings import EngineSettings


@dataclass
class CpuDecode:
    """With prefill workers on a CPU: the engine thread's intra-op threads for a decode step with no job
    in flight, and beside jobs (the workers hold the other CPUs); the meter of the decode steps with no
    job beside them (the governor's) and the pacer that holds decode steps beside jobs under contention."""

    threads: int | None = None  # None: left as they are
    threads_beside_jobs: int = 1
    meter: MeteredWork | None = None
    pacer: DecodePacer | None = None


class StepRunner:
    def __init__(
        self,
        runner: ModelRunner,
        batch: Batch,
        bank: AdapterBank,
        settings: EngineSettings,
        decode_graphs: DecodeGraphs | None,
        prefill_forward_cost: int,
        prefill_positions: Callable[[int], int] | None,
    ):
        self.runner, self.batch, self.bank, self.settings = runner, batch, bank, settings
        self.device = bank.device
        self.decode_graphs = decode_graphs
        self.prefill_forward_cost = prefill_forward_cost
        self.prefill_positions = prefill_positions  # bucketed row counts of a prefill forward, or None
        self.workers: PrefillWorkers | None = None
        self.cpu = CpuDecode()

    def adapter_batch(self, seqs: list[Sequence]) -> AdapterBatch:
        return build_batch([s.slot for s in seqs], self.bank.slot_kinds, self.device)

    # ----- prefill -----------------------------------------------------------------------------------
    def prepare(self, seq: Sequence, row: int) -> None:
        """A placed request's prefill inputs; it starts after the positions it took computed (its prompt's
        cached prefix; the last prompt position never is)."""
        cache = self.batch.cache
        ids = torch.tensor(seq.request.prompt_ids, dtype=torch.long, device=self.device)
        embeds = self.runner.embed(ids)  # [n, H]
        if seq.hook == HookSite.PREFILL:
            assert seq.resolved is not None
            storage = self.bank.prefill[seq.resolved.adapter.kind]
            embeds, seq.prefill_start = storage.prefill(seq.slot, row, embeds, cache)  # [m, H]
        seq.prefill_inputs = embeds
        seq.prefill_done = max(0, cache.cached_tokens(row) - seq.prefill_start)
        seq.length = seq.prefill_start + seq.prefill_done
        if cache.block_size:
            assert isinstance(cache, PagedKVCache)
            prefix_cache.register_blocks(cache, seq, row, self.settings.prefix_cache)

    def prefill(self, chunk: Chunk) -> torch.Tensor:
        """Run one chunk inline (its rows contiguous from the first prefilling row): logits [B, V]."""
        return self._chunk_forward(chunk, table=None).logits()

    def packed(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoding row's next token and one chunk in one forward: (decode logits [Bd, V],
        prefill logits [B, V])."""
        decoding = self.batch.decoding
        table = self.batch.cache.table[: len(decoding) + len(chunk)]  # [Bd + B, nb]: the chunk follows them
        return self._packed_forward(decoding, chunk, table)()

    def _rows(self, chunk: Chunk) -> list[PrefillRow]:
        rows = []
        for seq, take in chunk:
            assert seq.prefill_inputs is not None
            part = seq.prefill_inputs[seq.prefill_done : seq.prefill_done + take]
            rows.append(PrefillRow(embeds=part, start=seq.prefill_start + seq.prefill_done))
        return rows

    def _packed_forward(
        self, decoding: list[Sequence], chunk: Chunk, table: torch.Tensor
    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The packed forward, prepared on the engine thread; calling it (there, or on a prefill worker)
        returns (decode logits [Bd, V], prefill logits [B, V])."""
        slots = [s.slot for s in decoding] + [seq.slot for seq, take in chunk for _ in range(take)]
        tokens, positions = [s.output[-1] for s in decoding], [s.length for s in decoding]
        rows, batch = self._rows(chunk), build_batch(slots, self.bank.slot_kinds, self.device)
        return lambda: self.runner.packed(tokens, positions, rows, table, batch)

    def _chunk_forward(self, chunk: Chunk, table: torch.Tensor | None) -> ChunkForward:
        """The forward of `chunk`, grouped by length unless it scores (then one group)."""
        seqs = [seq for seq, _ in chunk]
        if any(seq.scores_prompt for seq in seqs):
            groups = [(0, len(chunk))]
        else:  # groups of similar lengths, each padded to its own longest row only
            groups = plan_groups(
                [take for _, take in chunk], self.prefill_forward_cost, self.prefill_positions
            )
        return ChunkForward(
            runner=self.runner,
            chunk=chunk,
            rows=self._rows(chunk),
            groups=groups,
            batches=[self.adapter_batch(seqs[a:b]) for a, b in groups],
            row_start=self.batch.num_decoding,
            table=table,
        )

    def submit(self, job: JobPlan) -> PrefillJob:
        """Start `job` on a prefill worker; its rows (riders and chunk) are in flight until it is booked."""
        assert self.workers is not None
        seqs = job.riders + [seq for seq, _ in job.chunk]
        rows = [self.batch.row_of(seq) for seq in seqs]
        table = self.batch.cache.table[rows].clone()  # [Bd + B, nb]: the worker's view of the rows' blocks
        run: Callable[[], object]
        if job.riders:
            run = self._packed_forward(job.riders, job.chunk, table)
        else:
            run = self._chunk_forward(job.chunk, table).logits
        for seq in seqs:
            seq.in_flight = True
        return PrefillJob(job.chunk, self.workers.submit(run), job.riders)

    # ----- decode ------------------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """The next-token logits [B, V] of decoding rows `seqs`: every decoding row, or (some ride in a
        prefill job) those not riding, addressed through their block tables."""
        table = None
        if len(seqs) != self.batch.num_decoding:
            assert isinstance(self.batch.cache, PagedKVCache) and self.decode_graphs is None
            table = self.batch.cache.table[[self.batch.row_of(s) for s in seqs]]  # [B, nb]
        if self.decode_graphs is not None:
            return self.decode_graphs.decode(
                [s.output[-1] for s in seqs], [s.length for s in seqs], [s.slot for s in seqs]
            )
        tokens = torch.tensor([s.output[-1] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.length for s in seqs], dtype=torch.long, device=self.device)
        return self.runner.decode(tokens, positions, self.adapter_batch(seqs), table)  # [B, V]

    def decode_beside_jobs(self, seqs: list[Sequence]) -> torch.Tensor:
        """With prefill workers: decode `seqs` on the threads the jobs in flight leave, metered and paced."""
        cpu, alone = self.cpu, not self.batch.jobs  # alone: no prefill job beside this decode step
        if cpu.threads is not None:
            set_thread_threads(cpu.threads if alone else min(cpu.threads, cpu.threads_beside_jobs))
        meter = cpu.meter if alone else None
        if meter is not None:
            meter.begin()
        if cpu.pacer is not None:
            cpu.pacer.begin()
        try:
            return self.decode(seqs)
        finally:
            if cpu.pacer is not None:
                cpu.pacer.end()
            if meter is not None:
                meter.end()

    def pace_hold(self) -> float:
        """Seconds the pacer holds this decode step (0: none): while the CPUs are fought over, a decode
        step beside prefill jobs waits its turn (cpu/decode_pacing.py)."""
        pacer = self.cpu.pacer
        return 0.0 if pacer is None else pacer.hold(beside_jobs=bool(self.batch.jobs))


@dataclass
class ChunkForward:
    """A prefill chunk's forward, prepared on the engine thread: `logits()` runs it (there, or on a
    prefill worker) and touches only these rows' KV blocks, inputs and (scoring rows) score lists."""

    runner: ModelRunner
    chunk: Chunk
    rows: list[PrefillRow]
    groups: list[tuple[int, int]]  # contiguous row groups, one forward each (prefill_groups.py)
    batches: list[AdapterBatch]  # each group's adapter rows
    row_start: int  # the chunk's first cache row (used when table is None)
    table: torch.Tensor | None  # [B, nb] a copy of the rows' block tables: rows may move meanwhile

    def logits(self) -> torch.Tensor:
        """Each row's last-position logits [B, V] (its cache filled for the chunk's positions)."""
        if any(seq.scores_prompt for seq, _ in self.chunk):
            return self._scoring_logits()
        table = self.table
        return torch.cat(
            [
                self.runner.prefill(
                    self.rows[a:b], self.row_start + a, batch, None if table is None else table[a:b]
                )
                for (a, b), batch in zip(self.groups, self.batches, strict=True)
            ]
        )  # [B, V]

    def _scoring_logits(self) -> torch.Tensor:
        """A chunk with scoring rows: keep every position's state, record the scored tokens' log-probs
        (see scoring.py). Returns each row's last-position logits [B, V], as prefill does."""
        runner, chunk = self.runner, self.chunk
        states = runner.prefill_states(self.rows, self.row_start, self.batches[0], self.table)  # [B, S, H]
        last = torch.tensor([take - 1 for _, take in chunk], device=states.device)
        for i, (seq, take) in enumerate(chunk):
            if seq.request.prompt_logprobs is not None:
                self._prompt_logprobs(seq, states[i, :take])
            elif seq.request.score_tokens:
                assert seq.prefill_inputs is not None  # still prefilling
                # virtual token embeddings in front of the prompt (prompt tuning), whatever the kind
                virtual_inputs = seq.prefill_inputs.shape[0] - len(seq.request.prompt_ids)
                seq.scores += chunk_logprobs(
                    runner.head,
                    states[i, :take],
                    seq.prefill_done,
                    virtual_inputs,
                    seq.request.prompt_ids,
                    seq.request.score_tokens,
                )
        return runner.head(states[torch.arange(len(chunk), device=states.device), last])

    def _prompt_logprobs(self, seq: Sequence, states: torch.Tensor) -> None:
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
            self.runner.head(states[index]), ids, seq.request.prompt_logprobs
        )
