"""The booking: what a step's forwards produced becomes tokens, events and row changes.

- `decoded` / `prefilled`: rows sample their token from their logits (sampling.py, a structured-output
  row masked first), stop on EOS, a stop sequence, the grammar or the length, and emit an event; a row
  whose prompt is complete samples its first token (its n choices fork from it, fork.py) and joins the
  decoding rows (Batch.promote); a scoring row finishes with its scores;
- `job_done`: a prefill worker's job, booked on the engine thread (rows cancelled meanwhile are skipped);
- `retire_finished`: finished rows free their cache row, KV blocks (their computed blocks stay cached for
  later requests, prefix_cache.py) and adapter slot; their final event is sent only then, so a caller that
  sees its last event also sees the engine's stats without it;
- `fail`: a forward that raised finishes only the requests it was for (and the choices forked from them).
"""

from __future__ import annotations

import logging
import time

import torch

from adapterserve.server.adapters.slots import AdapterBank
from adapterserve.server.engine import prefix_cache
from adapterserve.server.engine.batch import Batch
from adapterserve.server.engine.fork import fork
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.plan import Chunk, PrefillJob
from adapterserve.server.engine.sampling import sample_step
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.stats import EngineCounters
from adapterserve.server.engine.structured import GrammarMasks
from adapterserve.server.engine.types import FinishReason, TokenEvent, TokenLogprob
from adapterserve.server.errors import ResourceExhaustedError, ServeError

log = logging.getLogger(__name__)


class Booking:
    def __init__(
        self,
        batch: Batch,
        bank: AdapterBank,
        grammars: GrammarMasks,
        eos_ids: frozenset[int],
        counters: EngineCounters,
        prefix_caching: bool,
    ):
        self.batch, self.bank, self.grammars, self.eos_ids = batch, bank, grammars, eos_ids
        self.counters = counters
        self.prefix_caching = prefix_caching
        self.final_events: list[tuple[Sequence, TokenEvent]] = []  # sent once their rows are retired

    # ----- tokens ------------------------------------------------------------------------------------
    def decoded(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Decoding rows `seqs` take their next token (logits [B, V])."""
        for seq in seqs:
            seq.length += 1
        self.accept_tokens(seqs, logits)

    def packed(self, chunk: Chunk, logits: tuple[torch.Tensor, torch.Tensor]) -> None:
        """An inline packed forward: every decoding row's next token, then the chunk."""
        decode_logits, prefill_logits = logits
        self.decoded(self.batch.decoding, decode_logits)
        self.prefilled(chunk, prefill_logits)

    def job_done(self, job: PrefillJob) -> None:
        """A finished job: its riders take their next tokens, its rows their first (rows cancelled while it
        ran are skipped: they retire). A job that raised re-raises here (the step's guard fails its rows)."""
        if job.riders:
            decode_logits, logits = job.future.result()  # [Bd, V], [B, V]
            self.decoded(job.riders, decode_logits)
        else:
            logits = job.future.result()  # [B, V]
        live = [i for i, (seq, _) in enumerate(job.chunk) if not seq.finished]
        if live:
            self.prefilled([job.chunk[i] for i in live], logits[live])

    def prefilled(self, chunk: Chunk, logits: torch.Tensor) -> None:
        """A prefill chunk that ran (logits [B, V] of each row's last position): rows whose prompt is
        complete sample their first token and join the decoding rows."""
        seqs = [seq for seq, _ in chunk]
        complete: list[int] = []
        for i, (seq, take) in enumerate(chunk):
            seq.prefill_done += take
            seq.length = seq.prefill_start + seq.prefill_done
            self._register(seq, self.batch.row_of(seq))
            if seq.prefill_remaining == 0:
                seq.prefill_inputs = None
                self.counters.prefilled_prompts += 1
                if seq.request.score_tokens:
                    scores = seq.scores
                    if seq.request.prompt_logprobs is not None:  # scored as prompt logprobs
                        scores = [t.logprob for t in seq.prompt_scores[-seq.request.score_tokens :]]
                    self.finish(
                        seq,
                        FinishReason.SCORED,
                        logprobs=tuple(scores),
                        prompt_logprobs=tuple(seq.prompt_scores),
                    )
                else:
                    complete.append(i)
        if not complete:
            return
        accepting: list[Sequence] = []
        rows: list[int] = []
        for i in complete:
            choices = fork(self.batch, self.bank, seqs[i]) if seqs[i].pending_choices else []
            self.counters.forked_choices += len(choices)
            for s in [seqs[i], *choices]:
                accepting.append(s)
                rows.append(i)  # a request's choices all sample from its last-position logits
        self.accept_tokens(accepting, logits[rows])
        for s in accepting:
            if not s.finished:
                self.batch.promote(s)

    def accept_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        grammars = [s.grammar for s in seqs]
        if any(grammars):  # structured output: the grammar rows get their token masks (one -inf fill)
            logits = self.grammars.apply(logits, grammars)
        tokens, token_logprobs = sample_step(logits, [s.sampler for s in seqs])
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.finished:
                continue
            if seq.logits is not None:
                seq.logits.append(logits[i].detach().cpu())
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.output.append(token)
            delta = seq.text.push(token)
            params = seq.request.sampling
            reason = None
            if seq.grammar is not None and (failed := seq.grammar.consume(token, self.eos_ids)):
                self.finish(seq, FinishReason.ERROR, error=ServeError(failed))
                continue
            if token in self.eos_ids and not params.ignore_eos:
                reason = FinishReason.EOS
            elif seq.text.stopped or (seq.grammar is not None and seq.grammar.done):
                reason = FinishReason.STOP
            elif len(seq.output) >= params.max_new_tokens:
                reason = FinishReason.LENGTH
            extra: dict = {}
            if token_logprobs[i] is not None:
                extra["token_logprobs"] = (token_logprobs[i],)
            if len(seq.output) == 1 and seq.request.prompt_logprobs is not None:
                extra["prompt_logprobs"] = tuple(seq.prompt_scores)
            if reason is None:
                seq.emit(event_of(seq, (token,), delta, **extra))
            else:
                self.finish(seq, reason, token_ids=(token,), text=delta + seq.text.flush(), **extra)
        if any(grammars):  # the next step's masks, computed while it runs its forward
            self.grammars.prefetch([s.grammar for s in seqs if s.grammar is not None and not s.finished])

    # ----- endings -----------------------------------------------------------------------------------
    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        token_ids: tuple[int, ...] = (),
        text: str = "",
        error: BaseException | None = None,
        logprobs: tuple[float, ...] = (),
        token_logprobs: tuple[TokenLogprob, ...] = (),
        prompt_logprobs: tuple[TokenLogprob, ...] = (),
    ) -> None:
        seq.finished = True
        # Held back until the row and slot are released, so a caller that sees its last event also
        # sees the engine's stats without it.
        event = event_of(
            seq,
            token_ids,
            text,
            finish_reason=reason,
            error=error,
            logprobs=logprobs,
            token_logprobs=token_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        self.final_events.append((seq, event))
        # choices not forked yet (it ends before its prefill did): they end the same way, hold nothing
        pending, seq.pending_choices = seq.pending_choices, []
        for choice in pending:
            self.finish(choice, reason, error=error)

    def fail(self, seqs: list[Sequence], exc: Exception, device: torch.device) -> None:
        """A forward for `seqs` raised: finish them (and the choices forked from them) with an error."""
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        if oom:
            error: ServeError = ResourceExhaustedError("the device ran out of memory for this request")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            log.error("engine step failed", exc_info=exc)
            error = ServeError("internal engine error")
        running = self.batch.running
        rows = {id(seq) for seq in running}
        failing = {id(seq) for seq in seqs}
        # choices forked during the failed work (fork.py) fail with the sequence they came from
        seqs = seqs + [
            s for s in running if s.parent is not None and id(s.parent) in failing and id(s) not in failing
        ]
        for seq in seqs:
            if not seq.finished:
                self.finish(seq, FinishReason.ERROR, error=error)
            if id(seq) not in rows and seq.slot_key is not None:
                # admitted (its slot acquired) but the failure came before it got a row: retiring will
                # not see it, so its slot is released here
                self.bank.release(seq.slot_key)

    def retire_finished(self) -> None:
        """Free the rows of finished requests (Batch.close_row keeps the prefilling rows' order), then send
        the final events of those no longer in flight."""
        batch = self.batch
        row = 0
        while row < len(batch.running):
            seq = batch.running[row]
            if not seq.finished or seq.in_flight:  # a row in flight retires once its job is booked
                row += 1
                continue
            self._register(seq, row, with_output=True)  # its computed blocks stay cached
            batch.cache.release(row)
            batch.close_row(row)
            if seq.slot_key is not None:
                self.bank.release(seq.slot_key)
        events = [(seq, event) for seq, event in self.final_events if not seq.in_flight]
        self.final_events = [(seq, event) for seq, event in self.final_events if seq.in_flight]
        for seq, event in events:
            seq.emit(event)

    def _register(self, seq: Sequence, row: int, with_output: bool = False) -> None:
        cache = self.batch.cache
        if cache.block_size:
            assert isinstance(cache, PagedKVCache)
            prefix_cache.register_blocks(cache, seq, row, self.prefix_caching, with_output)


def event_of(seq: Sequence, token_ids: tuple[int, ...], text: str, **kw) -> TokenEvent:
    return TokenEvent(
        token_ids=token_ids,
        text=text,
        prompt_tokens=len(seq.request.prompt_ids),
        generated_tokens=len(seq.output),
        index=seq.index,
        queue_wait_s=seq.queue_wait,
        **kw,
    )
