"""The engine core: continuous batching over one base model with per-row adapters (synchronous).

One `step()`, on the engine thread:
  1. book the prefill jobs that finished on the workers; run control calls (pins, adapter updates) and
     reap cancelled requests (their rows and slots are freed);
  2. the scheduler (scheduler.py) admits waiting requests into free rows; the step runner
     (step_runner.py) gives them their prefill inputs;
  3. the scheduler plans the step's work (plan.py): a prefill chunk inline (packed with the decode rows
     or not) or a job per idle prefill worker, then the decode of every decoding row;
  4. the step runner runs the plan's forwards; the booking (booking.py) turns their logits into tokens
     and events, promotes rows whose prompt is complete and retires finished rows.
The rows themselves (decoding rows first, then rows still prefilling, in admission order) and the KV
cache that holds them are one `Batch` (batch.py) the three parts share; other threads hand requests,
cancellations and control calls in through the `RequestQueue` (request_queue.py). The async `Engine`
runs steps on a worker thread; `OfflineEngine` runs them in the caller's thread.

With prefill workers (a CPU engine, `start_prefill_workers`; cpu/prefill_workers.py) the chunks' forwards
run on worker threads while this thread decodes: rows in flight keep their blocks, slot and final event
until their job is booked, and adapter-slot writes (new adapters, pins) wait for the jobs in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.adapters.layers import AdapterContext, wrap_model
from adapterserve.server.adapters.slots import NO_ADAPTER, AdapterBank
from adapterserve.server.cpu import paged_attention as cpu_paged_attention
from adapterserve.server.cpu.decode_pacing import DecodePacer
from adapterserve.server.cpu.linear import describe_routes, prefill_positions, use_packed_linears
from adapterserve.server.cpu.prefill_workers import PrefillWorkers
from adapterserve.server.engine import faults
from adapterserve.server.engine.batch import Batch
from adapterserve.server.engine.booking import Booking
from adapterserve.server.engine.decode_graphs import decode_step_mode, make_decode_graphs
from adapterserve.server.engine.fork import make_choices
from adapterserve.server.engine.kv_cache import make_kv_cache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.plan import PrefillJob, StepPlan
from adapterserve.server.engine.prefill_groups import forward_cost_tokens
from adapterserve.server.engine.provider import ResolvedAdapter
from adapterserve.server.engine.request_limits import check_fits, check_request
from adapterserve.server.engine.request_queue import RequestQueue
from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.runner import ModelRunner
from adapterserve.server.engine.scheduler import Scheduler
from adapterserve.server.engine.sequence import EventSink, Sequence
from adapterserve.server.engine.stats import EngineCounters, EngineStats
from adapterserve.server.engine.step_runner import CpuDecode, StepRunner
from adapterserve.server.engine.structured import GrammarMasks
from adapterserve.server.engine.text import TextTracker
from adapterserve.server.engine.types import FinishReason, GenerationRequest
from adapterserve.server.errors import InvalidArgumentError, ResourceExhaustedError, ServeError
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
            log.info("CPU linears (measured per weight shape, cpu.linear: auto): %s", describe_routes())
        self.prefill_positions = prefill_positions if bucketed else None
        self.decode_graphs = make_decode_graphs(decode_mode, self.runner, self.cache, self.bank, settings)
        self.decode_step = decode_mode + (", compiled" if settings.compile_decode else "")
        eos_ids = eos_token_ids(base.tokenizer, base.model)
        self.grammars = GrammarMasks(base.tokenizer, eos_ids)  # structured output (structured.py)
        self.activity = threading.Event()  # set by new work and finished jobs: wakes a waiting step
        self.queue = RequestQueue(settings.max_queue, self.activity)
        self.batch = Batch(self.cache)
        self.counters = EngineCounters()
        # decoding rows ride in prefill jobs: packed steps on the workers, with the eager decode step (which
        # addresses rows through their block tables when some are riding)
        rides = settings.packed_steps and isinstance(self.cache, PagedKVCache) and self.decode_graphs is None
        self.scheduler = Scheduler(self.batch, self.queue, self.bank, settings, self.counters, rides)
        self.step_runner = StepRunner(
            self.runner,
            self.batch,
            self.bank,
            settings,
            self.decode_graphs,
            self.prefill_forward_cost,
            self.prefill_positions,
        )
        self.booking = Booking(
            self.batch, self.bank, self.grammars, eos_ids, self.counters, settings.prefix_cache
        )

    # ----- what the parts hold, read by the server's stats, the bench and tests ----------------------
    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence token ids (the booking's: it stops rows on them)."""
        return self.booking.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self.booking.eos_ids = ids

    @property
    def workers(self) -> PrefillWorkers | None:
        """The prefill workers (start_prefill_workers), or None: prefill runs inline."""
        return self.step_runner.workers

    @workers.setter
    def workers(self, workers: PrefillWorkers | None) -> None:
        self.step_runner.workers = workers

    @property
    def running(self) -> list[Sequence]:
        return self.batch.running

    @property
    def num_decoding(self) -> int:
        return self.batch.num_decoding

    @property
    def waiting(self) -> list[Sequence]:
        with self.queue.lock:
            return list(self.queue.waiting)

    @property
    def prefill_jobs(self) -> list[PrefillJob]:
        return self.batch.jobs

    @property
    def cpu_decode(self) -> CpuDecode:
        """The decode step's CPU threads, meter and pacer beside prefill workers (set by the Engine)."""
        return self.step_runner.cpu

    @property
    def decode_pacer(self) -> DecodePacer | None:
        return self.step_runner.cpu.pacer

    @decode_pacer.setter
    def decode_pacer(self, pacer: DecodePacer | None) -> None:
        self.step_runner.cpu.pacer = pacer

    @property
    def steps(self) -> int:
        return self.counters.steps

    @property
    def prefix_cache_queries(self) -> int:
        return self.counters.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.counters.prefix_cache_hits

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
        seq = self._sequence(request, resolved, emit)
        check_fits(seq, self.settings, self.cache)
        if request.n > 1:
            make_choices(seq, lambda choice, i, first: self._sequence(choice, resolved, emit, i, first))
        return seq

    def _sequence(
        self,
        request: GenerationRequest,
        resolved: ResolvedAdapter | None,
        emit: EventSink,
        index: int = 0,
        parent: Sequence | None = None,
    ) -> Sequence:
        """A sequence for `request` (choice `index` of it; choices after the first share `parent`'s prefill)."""
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
            index=index,
            parent=parent,
        )
        # a grammar matcher keeps state: each choice has its own (structured.py)
        if request.structured is not None and not request.score_tokens:
            seq.grammar = self.grammars.row(request.structured)  # InvalidArgumentError: cannot compile
        return seq

    def add(self, seq: Sequence) -> None:
        self.queue.add(seq)

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue several sequences at once, all or none (a request with a list of prompts)."""
        self.queue.add_all(seqs)

    def cancel(self, request_id: str) -> None:
        self.queue.cancel(request_id)

    def call_on_engine_thread(self, fn: Callable[[], object]) -> Future:
        """Run `fn` between two steps (device-slot changes must not race a forward); its result or
        exception arrives on the returned future."""
        return self.queue.call(fn)

    def slot_writes_pending(self) -> bool:
        """Whether the next step may write a device slot: a control call (pin, adapter update) is queued,
        or admitting a waiting request may load an adapter (prefill jobs must not run meanwhile)."""
        with self.queue.lock:
            return bool(self.queue.controls) or any(
                seq.slot_key is not None and self.bank.table.lookup(seq.slot_key) is None
                for seq in self.queue.waiting
            )

    def has_work(self) -> bool:
        return bool(self.batch.running) or self.queue.busy()

    def stats(self) -> EngineStats:
        """A snapshot (read from any thread: counters and sizes only)."""
        table, graphs, counters = self.bank.table, self.decode_graphs, self.counters
        decode = {}
        if graphs is not None:
            decode = {
                "decode_graph_captures": graphs.stats.captures,
                "decode_graph_replays": graphs.stats.replays,
                "decode_static_steps": graphs.stats.static_steps,
                "decode_fallback": graphs.stats.disabled,
            }
        return EngineStats(
            waiting=len(self.queue.waiting),
            running=len(self.batch.running),
            slots_in_use=sum(1 for e in table.entries.values() if e.refs > 0),
            slots_total=table.num_slots,
            slot_loads=table.stats.loads,
            slot_hits=table.stats.hits,
            slot_evictions=table.stats.evictions,
            kv_cache_bytes=self.cache.nbytes(),
            adapter_device_bytes=self.bank.device_bytes(),
            steps=counters.steps,
            decode_step=self.decode_step,
            prefilled_prompts=counters.prefilled_prompts,
            forked_choices=counters.forked_choices,
            prefix_cache_queries=counters.prefix_cache_queries,
            prefix_cache_hits=counters.prefix_cache_hits,
            prefix_cache_evictions=self.cache.evictions,
            prefix_cache_blocks=self.cache.cached_blocks,
            **decode,
        )

    # ----- the engine thread ------------------------------------------------------------------------
    def start_prefill_workers(self, count: int) -> None:
        """Run prefill forwards on `count` worker threads (one intra-op thread each) while this thread
        decodes (cpu/prefill_workers.py); needs the paged KV cache (a job addresses its rows' blocks)."""
        if not isinstance(self.cache, PagedKVCache):
            raise InvalidArgumentError("prefill workers need the paged KV cache (kv_cache='paged')")
        if self.workers is None:
            self.workers = PrefillWorkers(count, on_done=self.activity.set)
        cpu = self.step_runner.cpu
        if self.settings.cpu.decode_pace_ms and cpu.pacer is None:
            cpu.pacer = DecodePacer(self.settings.cpu.decode_pace_ms / 1000)

    def stop_prefill_workers(self) -> None:
        """Wait for the jobs in flight, book them, stop the workers (prefill runs inline again)."""
        if self.workers is None:
            return
        self.book_jobs(wait=True)
        workers, self.workers = self.workers, None
        workers.close()

    def step(self) -> None:
        """One step: what other threads handed in, then the scheduler's plan, run and booked."""
        self.counters.steps += 1
        self.activity.clear()  # before anything is looked at: a job ending from here on wakes the wait
        if self.batch.jobs and self.slot_writes_pending():
            self.book_jobs(wait=True)  # slot writes must not race a job reading the adapter bank
        self.run_controls()
        self.reap_cancelled()
        self.book_jobs()
        self.admit_and_start()
        self.run(self.scheduler.plan(self.workers.count if self.workers is not None else 0))

    def run(self, plan: StepPlan) -> None:
        """Run a step's plan and book what it computed; a forward that fails fails only its own rows."""
        runner, booking, chunk = self.step_runner, self.booking, plan.prefill
        for job in plan.jobs:
            self.batch.jobs.append(runner.submit(job))
        if chunk and plan.packed:
            rows = self.batch.decoding + [seq for seq, _ in chunk]
            self.run_guarded(rows, lambda: booking.packed(chunk, runner.packed(chunk)))
            self.retire_finished()
        elif chunk:
            self.run_guarded(
                [seq for seq, _ in chunk], lambda: booking.prefilled(chunk, runner.prefill(chunk))
            )
            self.retire_finished()
        if plan.decode:
            self._decode()

    def _decode(self) -> None:
        """Every decoding row not riding a job takes its next token; with prefill workers on the threads
        the jobs leave, unless the pacer holds it (or there is nothing to decode: then wait for a job)."""
        seqs = self.batch.free_decoding()
        jobs = self.batch.jobs
        if not seqs:
            if jobs and not any(job.future.done() for job in jobs):
                self.activity.wait(timeout=0.5)  # a job ending or new work wakes it
            return
        runner = self.step_runner
        if self.workers is None:
            self.run_guarded(seqs, lambda: self.booking.decoded(seqs, runner.decode(seqs)))
        elif hold := runner.pace_hold():
            self.activity.wait(timeout=hold)  # the CPU to the prefills; a job ending or new work wakes it
            return
        else:
            self.run_guarded(seqs, lambda: self.booking.decoded(seqs, runner.decode_beside_jobs(seqs)))
        self.retire_finished()

    def admit_and_start(self) -> None:
        """Admit waiting requests into free rows and give them their prefill inputs."""
        admitted = self.scheduler.admit()
        if admitted:
            self.run_guarded(admitted, lambda: self._start(admitted))
            self.retire_finished()

    def _start(self, admitted: list[Sequence]) -> None:
        for seq in admitted:  # one at a time: a request may take blocks the one before it registered
            self.step_runner.prepare(seq, self.scheduler.place(seq))

    def book_jobs(self, wait: bool = False) -> None:
        """Book the jobs that finished (all of them, waiting, when `wait`); a job that failed fails its rows."""
        done = self.batch.take_done_jobs(wait=wait)
        for job in done:
            self.run_guarded(job.seqs, lambda job=job: self.booking.job_done(job))
        if done:
            self.retire_finished()

    def retire_finished(self) -> None:
        self.booking.retire_finished()

    def fail_all(self, error: ServeError) -> None:
        """Finish every waiting and running request with an error (engine shutdown)."""
        if self.workers is not None:
            self.book_jobs(wait=True)
        for seq in self.queue.take_all() + self.batch.running:
            if not seq.finished:
                self.booking.finish(seq, FinishReason.ERROR, error=error)
        self.retire_finished()

    def run_guarded(self, seqs: list[Sequence], work: Callable[[], None]) -> None:
        """Run a forward; if it fails, fail only the requests it was for and keep serving."""
        try:
            faults.inject(seqs)  # a no-op unless the test hook is on (see faults.py)
            work()
        except Exception as exc:  # one bad batch must not take the server down
            self.booking.fail(seqs, exc, self.device)

    def run_controls(self) -> None:
        for fn, future in self.queue.take_controls():
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
        cancel, dropped = self.queue.take_cancelled()
        if not cancel:
            return
        for seq in dropped:
            self.booking.finish(seq, FinishReason.CANCELLED)
        for seq in self.batch.running:
            if seq.request.request_id in cancel and not seq.finished:
                self.booking.finish(seq, FinishReason.CANCELLED)
        self.retire_finished()
