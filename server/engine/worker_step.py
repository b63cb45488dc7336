"""An engine step with prefill workers (functions of the EngineCore, as prefill_phase.py's are).

The step books the prefill jobs that finished (their rows sample their first token and join the
decoding rows), admits waiting requests, starts jobs for idle workers (prefill_phase.launch) and decodes
the decoding rows on the engine thread while the jobs run; with no row to decode it waits for a job or
new work (`EngineCore.activity`), and while the CPUs are fought over a decode step beside jobs waits
its turn the same way (decode_pacing.py). With packed steps (EngineSettings.packed_steps) the decoding
rows ride in the next job launched instead (one forward on the worker computes their next tokens and the
chunk, see prefill_phase.launch); rows not in a job decode here as before. Adapter-slot writes (a new
adapter, a pin) wait for the jobs in flight: a job reads the adapter bank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterserve.server.cpu.omp_pools import set_thread_threads
from adapterserve.server.engine import prefill_phase

if TYPE_CHECKING:
    from adapterserve.server.engine.core import EngineCore


def step(core: EngineCore) -> None:
    core.activity.clear()  # before anything is looked at: a job ending from here on wakes the wait
    if core.prefill_jobs and core.slot_writes_pending():
        book_jobs(core, wait=True)  # slot writes must not race a job reading the adapter bank
    core.run_controls()
    core.reap_cancelled()
    book_jobs(core)
    core.admit_and_start()
    prefill_phase.launch(core)
    # every decoding row, less those riding in a job (packed steps: one forward for them and its chunk)
    seqs = prefill_phase.free_decoding(core)
    if seqs:
        alone = not core.prefill_jobs  # no prefill job beside this decode step
        pacer = core.decode_pacer
        if pacer is not None and (hold := pacer.hold(beside_jobs=not alone)) > 0:
            core.activity.wait(timeout=hold)  # the CPU to the prefills; a job ending or new work wakes it
            return
        if core.decode_threads is not None:
            beside = min(core.decode_threads, core.decode_threads_beside_jobs)
            set_thread_threads(core.decode_threads if alone else beside)
        meter = core.decode_meter if alone else None
        if meter is not None:
            meter.begin()
        if pacer is not None:
            pacer.begin()
        core.run_guarded(seqs, lambda: core.decode(seqs))
        if pacer is not None:
            pacer.end()
        if meter is not None:
            meter.end()
        core.retire_finished()
    elif core.prefill_jobs and not any(job.future.done() for job in core.prefill_jobs):
        core.activity.wait(timeout=0.5)


def book_jobs(core: EngineCore, wait: bool = False) -> None:
    """Book the jobs that finished (all of them, waiting, when `wait`); a job that failed fails its rows."""
    done = prefill_phase.done_jobs(core, wait=wait)
    for job in done:
        core.run_guarded(job.seqs, lambda job=job: prefill_phase.book(core, job))
    if done:
        core.retire_finished()
