"""Continuous batching under steady load: decode never stalls, prefill admits within its token budget,
every waiting request is admitted in bounded time (no starvation)."""

from __future__ import annotations

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings


def test_steady_load_keeps_decoding_and_admits_everyone(tiny_model_dir):
    settings = EngineSettings(max_batch_size=4, max_seq_len=64, max_prefill_tokens=16, max_queue=64)
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), settings)
    core = engine.core
    sinks: dict[int, list] = {}
    submitted_at: dict[int, int] = {}
    admitted_at: dict[int, int] = {}
    arrivals = 0
    for step in range(60):
        if step < 40:  # two new requests every step: always more demand than rows
            for _ in range(2):
                sinks[arrivals] = []
                prompt = [5 + arrivals % 50, 6, 7, 8, 9, 10]  # 6 tokens: the budget fits two per step
                engine.submit(
                    engine.request(prompt, max_new_tokens=3 + arrivals % 4, ignore_eos=True), sinks[arrivals]
                )
                submitted_at[arrivals] = step
                arrivals += 1
        running_before = {id(s): len(s.output) for s in core.running}
        waiting_before = len(core.waiting)
        core.step()
        # Decode made progress for every row that was running before the step.
        for seq in core.running:
            if id(seq) in running_before:
                assert len(seq.output) == running_before[id(seq)] + 1
        for i, sink in sinks.items():
            if sink and i not in admitted_at:
                admitted_at[i] = step
        if waiting_before and len(core.running) < settings.max_batch_size:
            # a free row with someone waiting: the step admitted at least one
            assert len(core.waiting) < waiting_before + 2
    step = 60
    while core.has_work():
        core.step()
        step += 1
        for i, sink in sinks.items():
            if sink and i not in admitted_at:
                admitted_at[i] = step
    assert all(sink and sink[-1].finish_reason is not None for sink in sinks.values())
    waits = [admitted_at[i] - submitted_at[i] for i in sinks]
    # FIFO admission: later arrivals never overtake earlier ones by more than a step.
    order = sorted(sinks, key=lambda i: admitted_at[i])
    assert all(submitted_at[a] <= submitted_at[b] + 1 for a, b in zip(order, order[1:], strict=False))
    # Demand is twice the capacity while requests arrive, so waits grow, but boundedly (FIFO).
    assert max(waits) < 100


def test_long_prompts_are_prefilled_in_chunks_within_the_budget(tiny_model_dir):
    settings = EngineSettings(max_batch_size=8, max_seq_len=128, max_prefill_tokens=20, max_queue=16)
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), settings)
    core = engine.core
    sinks = [[] for _ in range(4)]
    engine.submit(engine.request(list(range(5, 45)), max_new_tokens=3), sinks[0])  # 40 tokens = 2 chunks
    for i in range(1, 4):
        engine.submit(engine.request([5, 6, 7, 8, 9, 10, 11, 12], max_new_tokens=3), sinks[i])  # 8 each
    first_tokens = []
    for _ in range(4):
        core.step()
        first_tokens.append([bool(s) for s in sinks])
        assert sum(seq.prefill_done for seq in core.running) <= 40 + 3 * 8
    # Admitted together, the rows are given shortest prefill first (prefill_groups.py): the three short
    # prompts take the first 20-token budget, the long one is chunked after them.
    assert first_tokens == [
        [False, True, True, False],  # 8 + 8 + 4 of the third short prompt
        [False, True, True, True],  # its last 4, then 16 of the long prompt
        [False, True, True, True],  # 20 more of the long prompt (36 of 40)
        [True, True, True, True],  # its last 4: first token
    ]
    # the short ones decoded on while the long one prefilled: their 3 tokens came at steps 1, 2 and 3
    assert sum(len(ev.token_ids) for ev in sinks[1]) == 3 and sinks[1][-1].finish_reason is not None
    while core.has_work():
        core.step()
    # Chunking changes nothing in what is generated: the same requests one at a time, unchunked.
    whole = OfflineEngine(
        load_base_model(tiny_model_dir, quantize="none", device="cpu"),
        EngineSettings(max_batch_size=8, max_seq_len=128, max_prefill_tokens=512),
    )
    alone = [
        whole.generate([whole.request(p, max_new_tokens=3)])[0].token_ids
        for p in [list(range(5, 45))] + [[5, 6, 7, 8, 9, 10, 11, 12]] * 3
    ]
    assert [[t for ev in s for t in ev.token_ids] for s in sinks] == alone


def test_cancel_while_prefilling_frees_the_row_and_leaves_others_intact(tiny_model_dir):
    from adapterserve.server.engine.types import FinishReason

    settings = EngineSettings(max_batch_size=4, max_seq_len=128, max_prefill_tokens=10, max_queue=8)
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), settings)
    core = engine.core
    short = [5, 6, 7, 8]
    sinks = [[], [], []]
    engine.submit(engine.request(short, max_new_tokens=6, ignore_eos=True), sinks[0])
    long_req = engine.request(list(range(5, 65)), max_new_tokens=4)  # 60 tokens: 6+ chunks
    engine.submit(long_req, sinks[1])
    engine.submit(engine.request(short[::-1], max_new_tokens=6, ignore_eos=True), sinks[2])
    core.step()
    core.step()
    assert not sinks[1] and any(seq.request is long_req for seq in core.running)
    core.cancel(long_req.request_id)
    core.step()
    assert [ev.finish_reason for ev in sinks[1]] == [FinishReason.CANCELLED]
    assert all(seq.request is not long_req for seq in core.running)
    while core.has_work():
        core.step()
    whole = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), EngineSettings())
    for sink, prompt in ((sinks[0], short), (sinks[2], short[::-1])):
        want = whole.generate([whole.request(prompt, max_new_tokens=6, ignore_eos=True)])[0].token_ids
        assert [t for ev in sink for t in ev.token_ids] == want


def test_a_short_tail_is_prefilled_now_not_in_a_forward_of_its_own(tiny_model_dir):
    """Budget 16 (a tail of 2 may run over): prompts of 7 and 10 tokens are both prefilled in the first
    step (17 tokens), not 7 + 9 then a 1-token forward; the tokens are those of unchunked requests."""
    settings = EngineSettings(max_batch_size=4, max_seq_len=64, max_prefill_tokens=16, max_queue=8)
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), settings)
    prompts = [list(range(5, 12)), list(range(20, 30))]
    sinks = [[], []]
    for prompt, sink in zip(prompts, sinks, strict=True):
        engine.submit(engine.request(prompt, max_new_tokens=3), sink)
    forwards = []
    runner_prefill = engine.core.runner.prefill
    engine.core.runner.prefill = lambda rows, *a: (
        forwards.append(sum(r.embeds.shape[0] for r in rows)) or (runner_prefill(rows, *a))
    )
    engine.core.step()
    assert all(sinks) and sum(forwards) == 17
    while engine.core.has_work():
        engine.core.step()
    assert sum(forwards) == 17  # no forward for a tail
    whole = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), EngineSettings())
    for prompt, sink in zip(prompts, sinks, strict=True):
        want = whole.generate([whole.request(prompt, max_new_tokens=3)])[0].token_ids
        assert [t for ev in sink for t in ev.token_ids] == want
