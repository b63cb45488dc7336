"""Prefill is served in admission order (server/engine/scheduler.py, batch.py): whatever order the
prefill workers finish their jobs in, whichever rows retire, however n choices fork, a row still
prefilling is never overtaken by rows admitted after it. The bound, as the engine's docstring states:
a prefilling row's next chunk is handed out before any chunk of a row admitted after it, so once it is
admitted a request waits only for the prefill of rows admitted before it (and those admitted in the
same step with shorter prompts).

The sustained-load tests drive the engine step by step in a closed loop (every client submits again as
soon as its request ends) with prompts of several chunks; the worker test runs the jobs on a pool the
test controls, finishing later jobs before earlier ones."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter


class HeldWorkers:
    """A prefill worker pool whose jobs run when the test says (on the test's thread): `finish(i)` runs
    the i-th job still held and completes its future."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.held: list[tuple[Callable[[], object], Future]] = []

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self.held.append((fn, future))
        return future

    def finish(self, i: int) -> None:
        fn, future = self.held.pop(i)
        future.set_result(fn())

    def close(self) -> None:
        assert not self.held


class NoWait(threading.Event):
    def wait(self, timeout: float | None = None) -> bool:
        return True


def _engine(tiny_model_dir, **settings) -> OfflineEngine:
    options = {"max_batch_size": 6, "max_seq_len": 96, "max_prefill_tokens": 8, "max_queue": 64}
    options.update(settings)
    return OfflineEngine(
        load_base_model(tiny_model_dir, quantize="none", device="cpu"), EngineSettings(**options)
    )


class ClosedLoop:
    """`clients` clients, each submitting a new request as soon as its previous one ended; records the
    step each request was admitted (got a row) and the step its first token came."""

    def __init__(self, engine: OfflineEngine, clients: int, prompt_len: Callable[[int], int], n: int = 1):
        self.engine, self.core = engine, engine.core
        self.clients, self.prompt_len, self.n = clients, prompt_len, n
        self.sinks: list[list] = []
        self.seqs: list[Sequence] = []
        self.admitted: dict[int, int] = {}
        self.first_token: dict[int, int] = {}
        self.step_no = 0
        for _ in range(clients):
            self._submit()

    def _submit(self) -> None:
        i = len(self.sinks)
        prompt = [(7 * i + k) % 200 + 3 for k in range(self.prompt_len(i))]
        request = self.engine.request(prompt, max_new_tokens=3, ignore_eos=True, temperature=1.0, seed=i)
        request = dataclasses.replace(request, n=self.n)
        self.sinks.append([])
        self.seqs.append(self.engine.submit(request, self.sinks[i]))

    def step(self, submitting: bool) -> None:
        self.core.step()
        self.step_no += 1
        rows = {id(s) for s in self.core.running}
        for i, seq in enumerate(self.seqs):
            if i not in self.admitted and (id(seq) in rows or self.sinks[i]):
                self.admitted[i] = self.step_no
            if i not in self.first_token and any(e.token_ids for e in self.sinks[i]):
                self.first_token[i] = self.step_no
        if submitting:
            for _ in range(self.clients - self.clients_open()):
                self._submit()

    def _ended(self, sink: list) -> bool:
        return sum(1 for e in sink if e.finish_reason is not None) == self.n

    def clients_open(self) -> int:
        return sum(1 for sink in self.sinks if not self._ended(sink))

    def overtaken(self) -> dict[int, int]:
        """For each request: how many requests admitted in a later step got their first token first."""
        done = [i for i in self.first_token if i in self.admitted]
        return {
            i: sum(
                1
                for j in done
                if self.admitted[j] > self.admitted[i] and self.first_token[j] < self.first_token[i]
            )
            for i in done
        }

    def prefill_region_in_admission_order(self) -> bool:
        order = {id(seq): i for i, seq in enumerate(self.seqs)}
        prefilling = [order[id(s)] for s in self.core.running[self.core.num_decoding :] if id(s) in order]
        # rows admitted in one step are ordered by prompt length among themselves (prefill_groups.py)
        admitted = [self.admitted.get(i, self.step_no) for i in prefilling]
        return admitted == sorted(admitted)


def _long_and_short(i: int) -> int:
    return 40 if i % 3 == 0 else 12  # 5 chunks of the 8-token budget, or 2


@pytest.mark.parametrize("n", [1, 2])
def test_inline_prefill_under_sustained_load_serves_rows_in_admission_order(tiny_model_dir, n):
    """Rows retire every step and new ones arrive behind them: no row still prefilling is overtaken."""
    loop = ClosedLoop(_engine(tiny_model_dir), clients=5, prompt_len=_long_and_short, n=n)
    for _ in range(150):
        loop.step(submitting=True)
        assert loop.prefill_region_in_admission_order()
    while loop.core.has_work():
        loop.step(submitting=False)
    assert len(loop.first_token) > 30
    assert max(loop.overtaken().values()) == 0
    # each request's first event says how long it waited for its prefill to start
    waits = [sink[0].queue_wait_s for sink in loop.sinks]
    assert all(wait is not None and 0 <= wait < 60 for wait in waits)


@pytest.mark.parametrize(
    ("prompt_len", "max_wait"),
    [(lambda i: 8, 20), (_long_and_short, 40)],
    ids=["one-chunk", "long-and-short"],
)
def test_workers_finishing_later_jobs_first_starve_no_row(tiny_model_dir, prompt_len, max_wait):
    """Two prefill workers whose later jobs mostly finish first, 8 clients in a closed loop on 8 rows:
    rows are still served in admission order, and every request's first token comes within a bounded
    number of steps of its admission. (Before rows kept their order, a row that retired handed its place
    to the newest row: one request of this loop waited the whole run while 198 later ones went first.)"""
    engine = _engine(tiny_model_dir, max_batch_size=8)
    core = engine.core
    pool = HeldWorkers(2)
    core.workers = pool  # type: ignore[assignment]
    core.activity = NoWait()  # the held jobs end when the test says: a step need not wait for them
    loop = ClosedLoop(engine, clients=8, prompt_len=prompt_len)
    for step in range(200):
        loop.step(submitting=True)
        assert loop.prefill_region_in_admission_order()
        if pool.held:  # two steps in three the newest job ends first, else the oldest (each job ends)
            pool.finish(len(pool.held) - 1 if step % 3 else 0)
    for _ in range(400):
        if not core.has_work():
            break
        loop.step(submitting=False)
        if pool.held:
            pool.finish(0)
    assert not core.has_work()
    overtaken = loop.overtaken()
    assert len(overtaken) > 60
    # a newer row whose job ends first may get its first token before an older row still in flight: at
    # most the other rows in flight at once
    assert max(overtaken.values()) < core.settings.max_batch_size
    waits = [loop.first_token[i] - loop.admitted[i] for i in overtaken]
    assert max(waits) <= max_wait


def test_a_request_waiting_for_an_adapter_slot_is_overtaken_boundedly(tiny_model_dir, tmp_path):
    """One device slot, held by adapter `a` whose clients keep coming back: requests for `a` may pass a
    request for `b` that waits for the slot, but only max_batch_size of them; then admission is FIFO,
    `a`'s rows drain, the slot frees and `b` is served."""
    engine = _engine(tiny_model_dir, max_batch_size=4, adapter_slots=1)
    engine.add_adapter("a", make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "a", seed=1))
    engine.add_adapter("b", make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "b", seed=2))
    core = engine.core
    sinks: list[list] = []

    def submit(adapter: str) -> Sequence:
        sinks.append([])
        new_tokens = 2 + len(sinks) % 3  # a's rows end in different steps: one always holds the slot
        request = engine.request([5, 6, 7, 8], adapter=adapter, max_new_tokens=new_tokens, ignore_eos=True)
        return engine.submit(request, sinks[-1])

    for _ in range(3):
        submit("a")
    core.step()  # `a` holds the slot
    waiting_b = submit("b")
    for _ in range(100):
        if waiting_b.first_token_at is not None:
            break
        open_a = sum(1 for sink in sinks[:-1] if not sink or sink[-1].finish_reason is None)
        for _ in range(3 - open_a):  # a's clients come straight back
            submit("a")
        core.step()
    assert waiting_b.first_token_at is not None, "the request for b never got the slot"
    assert waiting_b.overtaken == core.settings.max_batch_size
