"""Prefill on worker threads while the engine thread decodes (server/cpu/prefill_workers.py,
engine/scheduler.py's jobs, booking.py): the same results as prefill inline, rows in flight keep their blocks and
final events until booked, a failing job fails its rows only, adapter-slot writes wait for the jobs."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from adapterserve.server.cpu.decode_pacing import DecodePacer
from adapterserve.server.cpu.prefill_workers import PrefillWorkers
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.types import FinishReason
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import CpuSettings, EngineSettings
from tests.helpers.peft_refs import make_every_kind

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9], [60, 61], [7, 7, 7, 7]]


def _engine(tiny_model_dir, workers: int, **settings) -> OfflineEngine:
    options = {"max_batch_size": 8, "max_seq_len": 64, "max_prefill_tokens": 8, "adapter_slots": 4}
    options.update(settings)
    engine = OfflineEngine(
        load_base_model(tiny_model_dir, quantize="none", device="cpu"), EngineSettings(**options)
    )
    if workers:
        engine.core.start_prefill_workers(workers)
    return engine


def _gate_prefill(engine: OfflineEngine) -> tuple[threading.Event, threading.Event]:
    """Make every prefill forward wait for `release` (set `entered` first): a job held in flight."""
    entered, release = threading.Event(), threading.Event()
    prefill = engine.core.runner.prefill

    def held(*args):
        entered.set()
        assert release.wait(30), "the test never released the prefill"
        return prefill(*args)

    engine.core.runner.prefill = held
    return entered, release


def test_pool_threads_run_one_intra_op_thread_each_and_hand_back_errors():
    seen: list[tuple[str, int]] = []

    def job():
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return 7

    def failing():
        raise ValueError("bad job")

    workers = PrefillWorkers(2)
    try:
        assert [workers.submit(job).result(10) for _ in range(4)] == [7] * 4
        with pytest.raises(ValueError, match="bad job"):
            workers.submit(failing).result(10)
    finally:
        workers.close()
    assert all(name.startswith("adapterserve-prefill") and threads == 1 for name, threads in seen)
    with pytest.raises(ValueError):
        PrefillWorkers(0)


def test_generation_scoring_and_choices_match_prefill_inline(tiny_model_dir):
    """Greedy tokens, scored log-probs and n choices: the same with prefill on workers as inline."""

    def run(engine: OfflineEngine):
        requests = [engine.request(p, max_new_tokens=6, ignore_eos=True) for p in PROMPTS]
        requests.append(engine.request(PROMPTS[0] * 3, max_new_tokens=5, ignore_eos=True))  # 15: chunked
        results = engine.generate(requests)
        scores = engine.score([(PROMPTS[0], [11, 12, 13]), (PROMPTS[2] * 2, [4, 5])])
        request = engine.request(PROMPTS[1], max_new_tokens=4, temperature=1.0, seed=3)
        (choices,) = engine.generate([dataclasses.replace(request, n=3)])
        return [r.token_ids for r in results], scores, [c.token_ids for c in choices.choices]

    inline = run(_engine(tiny_model_dir, 0))
    engine = _engine(tiny_model_dir, 2)
    with_workers = run(engine)
    engine.core.stop_prefill_workers()
    assert with_workers[0] == inline[0]
    assert with_workers[2] == inline[2]
    for got, want in zip(with_workers[1], inline[1], strict=True):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_a_request_cancelled_while_its_prefill_runs_keeps_its_blocks_until_the_job_is_booked(tiny_model_dir):
    engine = _engine(tiny_model_dir, 1)
    core = engine.core
    free_before = core.cache.free_blocks
    entered, release = _gate_prefill(engine)
    sink: list = []
    seq = engine.submit(engine.request(PROMPTS[0], max_new_tokens=4, ignore_eos=True), sink)
    core.step()  # admitted, its prefill job launched on the worker (held there)
    assert entered.wait(10) and seq.in_flight
    core.cancel(seq.request.request_id)
    core.step()  # cancelled while in flight: finished, but its row and blocks stay, no event yet
    assert seq.finished and seq in core.running and not sink
    assert core.cache.free_blocks < free_before
    release.set()
    while core.has_work():
        core.step()
    assert [e.finish_reason for e in sink] == [FinishReason.CANCELLED]
    assert core.cache.free_blocks == free_before and not core.running
    core.stop_prefill_workers()


def test_a_failing_prefill_job_fails_its_rows_only(tiny_model_dir):
    engine = _engine(tiny_model_dir, 2)
    core = engine.core
    prefill = core.runner.prefill
    bad_rows = []

    def flaky(rows, *args):
        if any(r.embeds.shape[0] == 3 for r in rows):  # PROMPTS[1]'s forward
            bad_rows.append(len(rows))
            raise RuntimeError("kernel failure")
        return prefill(rows, *args)

    core.runner.prefill = flaky
    good = engine.generate([engine.request(PROMPTS[0], max_new_tokens=3, ignore_eos=True)])[0]
    results = engine.generate([engine.request(p, max_new_tokens=3, ignore_eos=True) for p in PROMPTS[:2]])
    assert bad_rows
    assert results[0].token_ids == good.token_ids and results[0].finish_reason == FinishReason.LENGTH
    assert results[1].finish_reason == FinishReason.ERROR and "internal engine error" in str(results[1].error)
    assert not core.running and not core.prefill_jobs
    core.stop_prefill_workers()


def test_adapter_slot_writes_wait_for_the_jobs_in_flight(tiny_model_dir, tmp_path):
    """A new adapter is loaded into a device slot only after the prefill job running beside it is done (a
    job reads the adapter bank; a slot write must not race it)."""
    adapter_dirs = make_every_kind(tiny_model_dir, tmp_path)
    engine = _engine(tiny_model_dir, 1)
    core = engine.core
    engine.add_adapter("lora", adapter_dirs["lora_qv_r4"])
    entered, release = _gate_prefill(engine)
    writes_at_job_end: list[int] = []
    gated = core.runner.prefill

    def recording(*args):
        out = gated(*args)
        writes_at_job_end.append(core.bank.writes)
        return out

    core.runner.prefill = recording
    sinks: list[list] = [[], []]
    engine.submit(engine.request(PROMPTS[0], max_new_tokens=3, ignore_eos=True), sinks[0])
    core.step()
    assert entered.wait(10)
    writes_before = core.bank.writes
    engine.submit(engine.request(PROMPTS[1], adapter="lora", max_new_tokens=3, ignore_eos=True), sinks[1])
    threading.Timer(0.3, release.set).start()
    while core.has_work():
        core.step()
    core.stop_prefill_workers()
    assert writes_at_job_end[0] == writes_before  # nothing was written while the first job ran
    assert core.bank.writes > writes_before  # the adapter was loaded after it
    assert all(sink[-1].finish_reason == FinishReason.LENGTH for sink in sinks)


def test_stopping_the_workers_books_the_jobs_in_flight(tiny_model_dir):
    engine = _engine(tiny_model_dir, 2)
    core = engine.core
    sink: list = []
    seq = engine.submit(engine.request(PROMPTS[2], max_new_tokens=2, ignore_eos=True), sink)
    core.step()
    core.stop_prefill_workers()  # prefill runs inline from here on
    assert core.workers is None and not core.prefill_jobs and not seq.in_flight
    while core.has_work():
        core.step()
    assert len([t for e in sink for t in e.token_ids]) == 2


def test_paced_decode_steps_beside_jobs_give_the_same_tokens(tiny_model_dir):
    """With the engine thread reported as always waiting for a CPU, decode steps beside prefill jobs are
    held (cpu/decode_pacing.py) and the tokens stay those of prefill inline; cpu.decode_pace_ms=0 has no pacer."""
    assert _engine(tiny_model_dir, 1, cpu=CpuSettings(decode_pace_ms=0)).core.decode_pacer is None
    prompts = [[i + 3] * (4 + i % 5) for i in range(12)]

    def run(engine: OfflineEngine):
        requests = [engine.request(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
        return [r.token_ids for r in engine.generate(requests)]

    inline = run(_engine(tiny_model_dir, 0))
    engine = _engine(tiny_model_dir, 1, max_batch_size=4, max_prefill_tokens=4)
    # a thread that waits for a CPU all the time: its run delay grows with the wall clock
    engine.core.decode_pacer = DecodePacer(0.02, read_delay=time.monotonic)
    paced = run(engine)
    engine.core.stop_prefill_workers()
    assert paced == inline
    assert engine.core.decode_pacer.pacing
    assert engine.core.decode_pacer.paced_steps > 0


def test_decoding_rows_ride_in_a_prefill_job_and_rows_not_in_it_decode_beside_it(tiny_model_dir):
    """Packed steps on workers: the decoding rows ride in the next prefill job (one forward on the worker
    computes their next tokens and its chunk); a row promoted while that job is held decodes on the engine
    thread beside it, through its block table, and finishes (rows renumbered under the held job); a job
    that rows ride in holds at most `packed_chunk_tokens` prompt tokens. Every request gives the tokens of
    the engine with prefill inline and no packing."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    new_tokens = [40, 40, 6, 6]  # the first two still decode whenever the others' jobs run
    reference = _engine(tiny_model_dir, 0)
    want = [
        r.token_ids
        for r in reference.generate(
            [
                reference.request(p, max_new_tokens=n, ignore_eos=True)
                for p, n in zip(prompts, new_tokens, strict=True)
            ]
        )
    ]
    engine = _engine(tiny_model_dir, 2, packed_steps=True, packed_chunk_tokens=4)
    core = engine.core
    entered, release = threading.Event(), threading.Event()
    packed, decode = core.runner.packed, core.runner.decode
    decodes: list[tuple[int, bool, bool]] = []  # (rows, through a block table, beside a job in flight)

    def held_packed(*args):
        entered.set()
        assert release.wait(30), "the test never released the packed forward"
        return packed(*args)

    def recorded_decode(tokens, positions, batch, table=None):
        in_flight = any(not job.future.done() for job in core.prefill_jobs)
        decodes.append((tokens.shape[0], table is not None, in_flight))
        return decode(tokens, positions, batch, table)

    core.runner.packed, core.runner.decode = held_packed, recorded_decode
    sinks: list[list] = [[] for _ in prompts]

    def submit(i: int):
        request = engine.request(prompts[i], max_new_tokens=new_tokens[i], ignore_eos=True)
        return engine.submit(request, sinks[i])

    def step_until(done, what: str) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, what
            core.step()

    first = [submit(0), submit(1)]  # their prefill jobs carry no riders (nothing decodes yet)
    step_until(lambda: all(s.output for s in first) and not core.prefill_jobs, "the first two never decoded")
    submit(2)
    step_until(entered.is_set, "the third prompt's job never started")
    (job,) = core.prefill_jobs
    assert set(map(id, job.riders)) == set(map(id, first)) and all(s.in_flight for s in first)
    assert [take for _, take in job.chunk] == [4]  # 4 of the prompt's 7 tokens (max_prefill_tokens: 8)
    held_at = [len(s.output) for s in first]
    fourth = submit(3)  # the other worker prefills it (no free row to carry); then it decodes here
    step_until(lambda: fourth.finished and fourth not in core.running, "the fourth request never finished")
    assert not job.future.done() and [len(s.output) for s in first] == held_at  # held all along
    assert (1, True, True) in decodes  # the fourth row alone, through its block table, beside the job
    release.set()
    step_until(lambda: not core.has_work(), "the requests never finished")
    core.stop_prefill_workers()
    assert [[t for e in sink for t in e.token_ids] for sink in sinks] == want
