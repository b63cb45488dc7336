"""The engine core: continuous batching over one base model with per-row adapters (synchronous).

Rows: decoding rows first (0..num_decoding-1), then rows still prefilling. One `step()`:
  1. run control calls (pins) and reap cancelled requests (their rows and slots are freed);
  2. admit waiting requests into free rows (bounded by the batch size and the adapter slots);
  3. prefill (prefill_phase.py): up to `max_prefill_tokens` prompt tokens, in chunks, over the
     prefilling rows in order (a long prompt is spread over several steps: it never stalls decoding for
     long); a row whose prompt is complete samples its first token and joins the decoding rows;
  4. decode one token for every decoding row; with the paged cache and `EngineSettings.packed_steps`
     (off by default), 3 and 4 are one forward (runner.packed: every token a row of its own, so the weights are
     read once per step; rows just promoted by this step's prefill decode from the next step);
  5. retire finished rows (a decoding hole is filled by the last decoding row; the rows still
     prefilling close up behind it in their order: block-table rows on the paged cache).
Prefill is served in admission order: the rows still prefilling stay in the order they were admitted
(promotion and retirement shift them, never swap a newer one ahead), and every step hands out prompt
tokens in row order. Once admitted, a request waits only for the prefill of the requests admitted before
it, and those admitted in the same step with shorter prompts (prefill_groups.py). In the waiting queue
a request for an adapter that finds every device slot busy lets requests for resident adapters pass, at
most max_batch_size of them; then admission is first come, first served until a slot frees for it.
Every step does both prefill and decode work, so neither starves the other. The async `Engine` runs
steps on a worker thread; `OfflineEngine` runs them in the caller's thread.

With prefill workers (a CPU engine, `start_prefill_workers`; prefill_workers.py), step 3 hands the
chunk's forwards to worker threads instead and step 4 runs while they work: a step books the jobs that
finished (their rows sample their first token and join the decoding rows), starts jobs for idle workers,
and decodes. Rows in flight keep their blocks, slot and final event until booked; adapter-slot writes
(new adapters, pins) wait for the jobs in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.adapters.layers import AdapterBatch, AdapterContext, build_batch, wrap_model
from adapterserve.server.adapters.slots import NO_ADAPTER, AdapterBank
from adapterserve.server.cpu import paged_attention as cpu_paged_attention
from adapterserve.server.cpu.decode_pacing import DecodePacer
from adapterserve.server.cpu.governor import MeteredWork
from adapterserve.server.cpu.linear import describe_routes, prefill_positions, use_packed_linears
from adapterserve.server.cpu.prefill_workers import PrefillWorkers
from adapterserve.server.engine import faults, prefill_phase, worker_step
from adapterserve.server.engine.decode_graphs import decode_step_mode, make_decode_graphs
from adapterserve.server.engine.fork import make_choices
from adapterserve.server.engine.kv_cache import make_kv_cache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.prefill_groups import forward_cost_tokens
from adapterserve.server.engine.provider import ResolvedAdapter
from adapterserve.server.engine.request_limits import check_fits, check_request
from adapterserve.server.engine.runner import ModelRunner
from adapterserve.server.engine.sampling import RowSampler, sample_step
from adapterserve.server.engine.sequence import EventSink, Sequence
from adapterserve.server.engine.stats import EngineStats, engine_stats
from adapterserve.server.engine.structured import GrammarMasks
from adapterserve.server.engine.text import TextTracker
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent, TokenLogprob
from adapterserve.server.errors import (
    InvalidArgumentError,
    QueueFullError,
    ResourceExhaustedError,
    ServeError,
)
from adapterserve.server.model.family import TESTED_FAMILIES
from adapterserve.server.model.loading import LoadedBase, eos_token_ids
from adapterserve.server.settings import EngineSettings

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, base: LoadedBase, settings: EngineSettings, *, capture_logits: bool = False):
        self.base, self.settings = base, settings
        self.capture_logits = capture_logits
        spec = base.spec
        self.device, self.dtype = base.device, base.dtype
        decode_mode = decode_step_mode(
            settings, self.device
        )  # refused settings fail before the model is touched
        self.bank = AdapterBank(spec, settings.adapter_slots, self.dtype, self.device, settings.lora_backend)
        self.context = AdapterContext()
        packed = use_packed_linears(settings.cpu.linear, self.device)  # refused settings fail here
        layer_linears = wrap_model(
            base.model, self.bank, self.context, pack_cpu_linears=settings.cpu.linear if packed else None
        )
        self.cache = make_kv_cache(settings, spec, self.dtype, self.device)
        paged_kernel = cpu_paged_attention.use_kernel(
            settings.cpu.paged_attention, self.device, self.dtype, isinstance(self.cache, PagedKVCache)
        )
        self.runner = ModelRunner(base.model, self.cache, self.context, paged_kernel=paged_kernel)
        self.forward_check = self.runner.verify()  # UnsupportedModelError: refused before serving
        if spec.model_type not in TESTED_FAMILIES:
            log.warning(
                "model_type %r is not among the tested families (%s); its forward matched transformers' "
                "in the start-up check (max logit difference %s)",
                spec.model_type,
                ", ".join(sorted(TESTED_FAMILIES)),
                self.forward_check,
            )
        self.prefill_forward_cost = forward_cost_tokens(self.device, settings.prefill_group_cost)
        # what a prefill forward computes: bucketed row counts where its linears run on oneDNN
        bucketed = any(linear.route.many_rows_onednn for linear in layer_linears)
        if packed and settings.cpu.linear == "auto":
            log.info("CPU linears (measured per weight shape, cpu_linear: auto): %s", describe_routes())
        self.prefill_positions = prefill_positions if bucketed else None
        self.decode_graphs = make_decode_graphs(decode_mode, self.runner, self.cache, self.bank, settings)
        self.decode_step = decode_mode + (", compiled" if settings.compile_decode else "")
        self.eos_ids = eos_token_ids(base.tokenizer, base.model)
        self.grammars = GrammarMasks(base.tokenizer, self.eos_ids)  # structured output (structured.py)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == cache row: decoding rows, then prefilling rows
        self.num_decoding = 0
        self._lock = threading.Lock()  # guards `waiting` and `_cancel` (touched by other threads)
        self._cancel: set[str] = set()
        self._controls: deque[tuple[Callable[[], object], Future]] = deque()  # run on the engine thread
        self._final_events: list[tuple[Sequence, TokenEvent]] = []  # sent once their rows are retired
        self.workers: PrefillWorkers | None = None  # prefill beside decode (start_prefill_workers)
        self.prefill_jobs: list[prefill_phase.PrefillJob] = []  # in flight on the workers, oldest first
        self.activity = threading.Event()  # set by new work and finished jobs: wakes a waiting step
        # with prefill workers: the engine thread's intra-op threads for a decode step with no job in
        # flight, and beside jobs (the workers hold the other CPUs); None: left as they are
        self.decode_threads: int | None = None
        self.decode_threads_beside_jobs = 1
        self.decode_meter: MeteredWork | None = None  # meters the decode steps with no job beside them
        self.decode_pacer: DecodePacer | None = None  # holds decode steps beside jobs under contention
        self.steps = 0
        self.prefilled_prompts = 0  # prompts whose prefill completed (n choices of a request: one)
        self.forked_choices = 0  # choices that took a copy of another's prefill (fork.py)
        # prefix caching (prefix_cache.py): prompt positions looked up, and those found computed
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----- called from any thread -------------------------------------------------------------------
    def new_sequence(
        self, request: GenerationRequest, resolved: ResolvedAdapter | None, emit: EventSink
    ) -> Sequence:
        """Validate a request against the engine's limits (request_limits.py) and wrap it (does not
        queue it); a prompt-kind adapter rewrites the prompt here, and n choices get their sequences."""
        check_request(request, self.base.spec.vocab_size, self.settings)
        if resolved is not None and resolved.adapter.handler.hook == HookSite.PROMPT:
            adapter = resolved.adapter
            ids = adapter.handler.rewrite_prompt(adapter.weights, request.prompt_ids, self.base.tokenizer)
            request = dataclasses.replace(request, prompt_ids=tuple(ids))
        p = request.sampling
        seq = Sequence(
            request=request,
            resolved=resolved,
            emit=emit,
            sampler=RowSampler.create(p, request.prompt_ids, self.device, tuple(self.eos_ids)),
            text=TextTracker(
                self.base.tokenizer,
                p.stop,
                frozenset() if p.ignore_eos else self.eos_ids,
                stop_after=p.min_tokens,
            ),
            logits=[] if self.capture_logits else None,
        )
        if request.structured is not None and not request.score_tokens:
            seq.grammar = self.grammars.row(request.structured)  # InvalidArgumentError: cannot compile
        check_fits(seq, self.settings, self.cache)
        if request.n > 1:
            make_choices(self, seq)
        return seq

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.settings.max_queue:
                raise QueueFullError(
                    f"the waiting queue is full ({self.settings.max_queue} requests); retry later"
                )
            self.waiting.append(seq)
        self.activity.set()

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue several sequences at once, all or none (a request with a list of prompts)."""
        if len(seqs) > self.settings.max_queue:
            raise InvalidArgumentError(
                f"prompt: {len(seqs)} prompts, more than the engine's waiting queue holds "
                f"({self.settings.max_queue}; the server's --max-queue flag raises it)"
            )
        with self._lock:
            if len(self.waiting) + len(seqs) > self.settings.max_queue:
                raise QueueFullError(
                    f"the waiting queue has no room for {len(seqs)} prompts ({len(self.waiting)} of "
                    f"{self.settings.max_queue} requests waiting); retry later"
                )
            self.waiting.extend(seqs)
        self.activity.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)
        self.activity.set()

    def call_on_engine_thread(self, fn: Callable[[], object]) -> Future:
        """Run `fn` between two steps (device-slot changes must not race a forward); its result or
        exception arrives on the returned future."""
        future: Future = Future()
        with self._lock:
            self._controls.append((fn, future))
        self.activity.set()
        return future

    def slot_writes_pending(self) -> bool:
        """Whether the next step may write a device slot: a control call (pin, adapter update) is queued,
        or admitting a waiting request may load an adapter (prefill jobs must not run meanwhile)."""
        with self._lock:
            return bool(self._controls) or any(
                seq.slot_key is not None and self.bank.table.lookup(seq.slot_key) is None
                for seq in self.waiting
            )

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._cancel or self._controls)

    def stats(self) -> EngineStats:
        return engine_stats(self)

    # ----- the engine thread ------------------------------------------------------------------------
    def start_prefill_workers(self, count: int) -> None:
        """Run prefill forwards on `count` worker threads (one intra-op thread each) while this thread
        decodes (prefill_workers.py); needs the paged KV cache (a job addresses its rows' blocks)."""
        if not isinstance(self.cache, PagedKVCache):
            raise InvalidArgumentError("prefill workers need the paged KV cache (kv_cache='paged')")
        if self.workers is None:
            self.workers = PrefillWorkers(count, on_done=self.activity.set)
        if self.settings.cpu.decode_pace_ms and self.decode_pacer is None:
            self.decode_pacer = DecodePacer(self.settings.cpu.decode_pace_ms / 1000)

    def stop_prefill_workers(self) -> None:
        """Wait for the jobs in flight, book them, stop the workers (prefill runs inline again)."""
        if self.workers is None:
            return
        worker_step.book_jobs(self, wait=True)
        workers, self.workers = self.workers, None
        workers.close()

    def step(self) -> None:
        self.steps += 1
        if self.workers is not None:
            worker_step.step(self)
            return
        self.run_controls()
        self.reap_cancelled()
        self.admit_and_start()
        chunk = prefill_phase.next_chunk(self)
        if chunk and self.num_decoding and prefill_phase.can_pack(self, chunk):
            rows = self.running[: self.num_decoding] + [seq for seq, _ in chunk]
            self.run_guarded(rows, lambda: prefill_phase.run_packed(self, chunk))
            self.retire_finished()
            return
        if chunk:
            self.run_guarded([seq for seq, _ in chunk], lambda: prefill_phase.run(self, chunk))
            self.retire_finished()
        if self.num_decoding:
            rows = self.running[: self.num_decoding]
            self.run_guarded(rows, self.decode)
            self.retire_finished()

    def admit_and_start(self) -> None:
        """Admit waiting requests into free rows and give them their prefill inputs."""
        admitted = self._admit()
        if admitted:
            self.run_guarded(admitted, lambda: prefill_phase.start(self, admitted))
            self.retire_finished()

    def fail_all(self, error: ServeError) -> None:
        """Finish every waiting and running request with an error (engine shutdown)."""
        if self.workers is not None:
            worker_step.book_jobs(self, wait=True)
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in waiting + self.running:
            if not seq.finished:
                self.finish(seq, FinishReason.ERROR, error=error)
        self.retire_finished()

    def run_guarded(self, seqs: list[Sequence], work: Callable[[], None]) -> None:
        """Run a forward; if it fails, fail only the requests it was for and keep serving."""
        try:
            faults.inject(seqs)  # a no-op unless the test hook is on (see faults.py)
            work()
        except Exception as exc:  # one bad batch must not take the server down
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            if oom:
                error: ServeError = ResourceExhaustedError("the device ran out of memory for this request")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                log.exception("engine step failed")
                error = ServeError("internal engine error")
            rows = {id(seq) for seq in self.running}
            failing = {id(seq) for seq in seqs}
            # choices forked during the failed work (fork.py) fail with the sequence they came from
            seqs = seqs + [
                s
                for s in self.running
                if s.parent is not None and id(s.parent) in failing and id(s) not in failing
            ]
            for seq in seqs:
                if not seq.finished:
                    self.finish(seq, FinishReason.ERROR, error=error)
                if id(seq) not in rows and seq.slot_key is not None:
                    # admitted (its slot acquired) but the failure came before it got a row:
                    # retiring will not see it, so its slot is released here
                    self.bank.release(seq.slot_key)

    def run_controls(self) -> None:
        with self._lock:
            controls, self._controls = list(self._controls), deque()
        for fn, future in controls:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the caller
                future.set_exception(exc)

    def pin_adapter(self, resolved: ResolvedAdapter) -> int:
        """(Engine thread) load `resolved` into a device slot and pin it there."""
        if resolved.adapter.handler.hook == HookSite.PROMPT:
            return NO_ADAPTER  # applied to the prompt's tokens: nothing lives on the device
        slot = self.bank.pin((resolved.name, resolved.version), resolved.adapter)
        if slot is None:
            raise ResourceExhaustedError(
                f"cannot pin {resolved.name!r} in a device slot: at most {self.bank.table.num_slots - 1} "
                "adapters can be pinned, and slots used by running requests are not taken"
            )
        return slot

    def reap_cancelled(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            if not cancel:
                return
            kept: deque[Sequence] = deque()
            dropped = []
            for seq in self.waiting:
                (dropped if seq.request.request_id in cancel else kept).append(seq)
            self.waiting = kept
        for seq in dropped:
            self.finish(seq, FinishReason.CANCELLED)
        for seq in self.running:
            if seq.request.request_id in cancel and not seq.finished:
                self.finish(seq, FinishReason.CANCELLED)
        self.retire_finished()

    def _admit(self) -> list[Sequence]:
        # rows and KV tokens promised to the choices of running requests not forked yet (fork.py)
        promised = [c.kv_tokens for s in self.running for c in s.pending_choices]
        free_rows = self.settings.max_batch_size - len(self.running) - len(promised)
        admitted: list[Sequence] = []
        slots_full = False  # once a new adapter found no slot, only resident ones can be admitted
        with self._lock:
            skipped: deque[Sequence] = deque()
            reserving: list[int] = list(promised)  # KV tokens of each row admitted in this call (+ promised)
            while self.waiting and len(reserving) - len(promised) + self.waiting[0].request.n <= free_rows:
                head = self.waiting[0]
                if not self.cache.can_reserve([*reserving, *[head.kv_tokens] * head.request.n]):
                    break  # FIFO: wait for running requests to free KV blocks
                seq = self.waiting.popleft()
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
                for waiting in skipped:
                    waiting.overtaken += 1
                admitted.append(seq)
                reserving += [seq.kv_tokens] * seq.request.n
            self.waiting.extendleft(reversed(skipped))
        for seq in admitted:
            seq.admitted_at = time.monotonic()
        return admitted

    def adapter_batch(self, seqs: list[Sequence]) -> AdapterBatch:
        return build_batch([s.slot for s in seqs], self.bank.slot_kinds, self.device)

    def decode(self, seqs: list[Sequence] | None = None) -> None:
        """One token for `seqs` (default: every decoding row); other rows than the decoding rows' prefix
        (some ride in a prefill job, prefill_phase.launch) are addressed through their block tables."""
        table = None
        if seqs is None or len(seqs) == self.num_decoding:
            seqs = self.running[: self.num_decoding]
        else:
            assert isinstance(self.cache, PagedKVCache) and self.decode_graphs is None
            table = self.cache.table[[self.running.index(s) for s in seqs]]  # [B, nb]
        if self.decode_graphs is not None:
            logits = self.decode_graphs.decode(
                [s.output[-1] for s in seqs], [s.length for s in seqs], [s.slot for s in seqs]
            )
        else:
            tokens = torch.tensor([s.output[-1] for s in seqs], dtype=torch.long, device=self.device)
            positions = torch.tensor([s.length for s in seqs], dtype=torch.long, device=self.device)
            logits = self.runner.decode(tokens, positions, self.adapter_batch(seqs), table)  # [B, V]
        for seq in seqs:
            seq.length += 1
        self.accept_tokens(seqs, logits)

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
                seq.emit(self._event(seq, (token,), delta, **extra))
            else:
                self.finish(seq, reason, token_ids=(token,), text=delta + seq.text.flush(), **extra)
        if any(grammars):  # the next step's masks, computed while it runs its forward
            self.grammars.prefetch([s.grammar for s in seqs if s.grammar is not None and not s.finished])

    def _event(self, seq: Sequence, token_ids: tuple[int, ...], text: str, **kw) -> TokenEvent:
        return TokenEvent(
            token_ids=token_ids,
            text=text,
            prompt_tokens=len(seq.request.prompt_ids),
            generated_tokens=len(seq.output),
            index=seq.index,
            queue_wait_s=seq.queue_wait,
            **kw,
        )

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
        event = self._event(
            seq,
            token_ids,
            text,
            finish_reason=reason,
            error=error,
            logprobs=logprobs,
            token_logprobs=token_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        self._final_events.append((seq, event))
        # choices not forked yet (it ends before its prefill did): they end the same way, hold nothing
        pending, seq.pending_choices = seq.pending_choices, []
        for choice in pending:
            self.finish(choice, reason, error=error)

    def _move(self, src: int, dst: int) -> None:
        moved = self.running[src]
        self.cache.move_row(src, dst, moved.length)
        self.running[dst] = moved

    def shift_row(self, src: int, dst: int) -> None:
        """Row src becomes row dst; the rows from dst up to src (src > dst) each move one row on, in the
        same order (a paged cache swaps block-table rows; a dense one copies each row's filled positions).
        A row whose prefill completed joins the decoding rows this way, so the rows still prefilling keep
        their admission order (prefill_phase.next_chunk and launch serve them in row order)."""
        for row in range(src, dst, -1):
            above, below = self.running[row - 1], self.running[row]
            self.cache.swap_rows(row - 1, row, max(above.length, below.length))
            self.running[row - 1], self.running[row] = below, above

    def retire_finished(self) -> None:
        """Free the rows of finished requests. A decoding row's hole is filled by the last decoding row
        (their order does not matter); the rows still prefilling then close up behind it, keeping their
        admission order (moving the newest row into the hole would serve it first)."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not seq.finished or seq.in_flight:  # a row in flight retires once its job is booked
                i += 1
                continue
            # its computed blocks stay cached for later requests (prefix_cache.py)
            prefill_phase.register_blocks(self, seq, i, with_output=True)
            self.cache.release(i)
            hole = i
            if i < self.num_decoding:
                last_decoding = self.num_decoding - 1
                if i != last_decoding:
                    self._move(last_decoding, i)
                hole = last_decoding
                self.num_decoding -= 1
            for row in range(hole + 1, len(self.running)):  # close up: each later row one row down
                self._move(row, row - 1)
            self.running.pop()
            if seq.slot_key is not None:
                self.bank.release(seq.slot_key)
        events = [(seq, event) for seq, event in self._final_events if not seq.in_flight]
        self._final_events = [(seq, event) for seq, event in self._final_events if seq.in_flight]
        for seq, event in events:
            seq.emit(event)
