"""The correctness invariant: a request with adapter X inside a mixed, continuously batched run gives
what PEFT's PeftModel with adapter X alone gives (greedy tokens identical, logits close), for every
adapter kind, on the plain fp32 base and on the bitsandbytes 4-bit base; and in bf16 on a CPU (the
linear kinds' slots in float32 there, as PEFT computes them)."""

from __future__ import annotations

import threading

import pytest
import torch

from adapterserve.server.adapters.kind import kind_names
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.bf16_invariant import (
    check_rows_match,
    engine_first_tokens,
    every_kind_rows,
    peft_first_tokens,
)
from tests.helpers.peft_refs import (
    ADAPTER_KINDS,
    make_every_kind,
    peft_greedy,
    peft_reference_model,
    reference_prompt,
)

STEPS = 6
PROMPTS = [
    [5, 6, 7, 8, 9],
    [40, 41, 42],
    [100, 17, 250, 3, 77, 12, 9],
    [60, 61],
]
ATOL = {"none": 1e-4, "nf4": 1e-3}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_every_kind(tiny_model_dir, root)


def _plan():
    """(adapter or None, prompt) rows: base rows and every adapter kind, some adapters twice."""
    rows = [(None, PROMPTS[0]), (None, PROMPTS[2])]
    for i, kind in enumerate(ADAPTER_KINDS):
        rows.append((kind, PROMPTS[i % len(PROMPTS)]))
    rows.append(("lora_qv_r4", PROMPTS[3]))
    rows.append(("prefix", PROMPTS[1]))
    return rows


def _references(tiny_model_dir, adapter_dirs, quantize, rows):
    refs = {}
    models = {}
    for adapter, prompt in rows:
        if adapter not in models:
            models[adapter] = peft_reference_model(
                tiny_model_dir, None if adapter is None else adapter_dirs[adapter], quantize
            )
        adapter_dir = None if adapter is None else adapter_dirs[adapter]
        seen = reference_prompt(tiny_model_dir, adapter_dir, prompt)  # a template wraps the prompt
        refs[(adapter, tuple(prompt))] = peft_greedy(models[adapter], seen, STEPS)
    return refs


# decode: eager = the dynamic reference step; static = the static-shape step CUDA graphs capture (rows
# padded to a bucket, keys to a length bucket, inputs in preallocated buffers); compiled = that step
# through torch.compile. group_cost: EngineSettings.prefill_group_cost (None: the device default; 0: the
# prefill chunk runs as one forward per run of equal lengths). workers: prefill forwards on that many
# worker threads while the engine thread decodes (cpu/prefill_workers.py; 0: inline).
@pytest.mark.parametrize(
    "quantize,prefill_budget,decode,group_cost,workers",
    [
        ("none", 512, "eager", None, 0),
        ("nf4", 512, "eager", None, 0),
        ("none", 5, "eager", None, 0),  # 5: prompts (and virtual tokens) prefilled in chunks
        ("none", 512, "eager", 0, 0),
        ("none", 512, "static", None, 0),
        ("nf4", 512, "static", None, 0),
        ("none", 512, "compiled", None, 0),
        ("none", 5, "eager", None, 2),
        ("nf4", 16, "eager", None, 2),
        ("none", 16, "compiled", None, 2),
    ],
)
def test_mixed_batch_matches_peft_per_adapter(
    tiny_model_dir, adapter_dirs, quantize, prefill_budget, decode, group_cost, workers
):
    rows = _plan()
    refs = _references(tiny_model_dir, adapter_dirs, quantize, rows)
    base = load_base_model(tiny_model_dir, quantize=quantize, device="cpu")
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=16,
            max_seq_len=64,
            adapter_slots=len(ADAPTER_KINDS),
            max_prefill_tokens=prefill_budget,
            decode_step="eager" if decode == "eager" else "static",
            compile_decode=decode == "compiled",
            prefill_group_cost=group_cost,
        ),
        capture_logits=True,
    )
    if workers:
        engine.core.start_prefill_workers(workers)
    prefill_forwards, prefill_threads = [], set()
    runner_prefill = engine.core.runner.prefill
    engine.core.runner.prefill = lambda rows, *a: (
        prefill_forwards.append(len(rows))
        or prefill_threads.add(threading.current_thread().name)
        or runner_prefill(rows, *a)
    )
    if decode != "eager":
        assert engine.core.decode_graphs is not None
    served = {engine.add_adapter(kind, path).adapter.kind for kind, path in adapter_dirs.items()}
    assert served == set(kind_names()), "the invariant must cover every registered adapter kind"
    results = engine.generate(
        [engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in rows]
    )
    engine.core.stop_prefill_workers()
    if workers:  # every prefill forward ran on the workers, none on the engine thread
        assert prefill_threads and all(name.startswith("adapterserve-prefill") for name in prefill_threads)
    assert engine.core.bank.table.stats.evictions == 0  # every adapter stayed resident: one mixed batch
    if decode == "compiled":  # the compiled step ran: it did not fall back to the uncompiled one
        assert engine.core.decode_graphs.stats.disabled is None

    base_tokens = {tuple(p): refs[(None, tuple(p))][0] for a, p in rows if a is None}
    for (adapter, prompt), result in zip(rows, results, strict=True):
        want_tokens, want_logits = refs[(adapter, tuple(prompt))]
        assert result.token_ids == want_tokens, f"{adapter}: {result.token_ids} != PEFT {want_tokens}"
        got = torch.stack(result.logits)
        want = torch.stack(want_logits)
        assert torch.allclose(got, want, atol=ATOL[quantize], rtol=0), (
            f"{adapter}: max logit diff {(got - want).abs().max():.2e}"
        )
    # Non-trivial adapters: every adapter changes the base's logits clearly.
    plain = peft_reference_model(tiny_model_dir, None, quantize)
    for kind in ADAPTER_KINDS:
        prompt = PROMPTS[list(ADAPTER_KINDS).index(kind) % len(PROMPTS)]
        _, base_logits = peft_greedy(plain, prompt, 1)
        assert (refs[(kind, tuple(prompt))][1][0] - base_logits[0]).abs().max() > 1e-2, kind
    assert base_tokens  # base rows were part of the batch
    if group_cost == 0:  # rows of unequal lengths really ran as several forwards, and all of them ran
        assert len(prefill_forwards) > 1 and sum(prefill_forwards) == len(rows)
    if decode != "eager":
        # every decode step ran the static step (13 rows padded to the 16-row bucket); with workers rows
        # finish their prefills at different steps, so there are more decode steps, all static
        stats = engine.core.decode_graphs.stats
        assert stats.replays == 0
        assert stats.static_steps >= STEPS - 1 if workers else stats.static_steps == STEPS - 1
    if decode == "compiled":
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0  # the step really went through torch.compile


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_joining_requests_do_not_change_running_outputs(tiny_model_dir, adapter_dirs, decode):
    """static: decode steps pad their rows to a bucket while other rows are still prefilling; the padding
    rows must write nowhere those rows read."""
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base, EngineSettings(max_batch_size=4, max_seq_len=64, adapter_slots=3, decode_step=decode)
    )
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    rows = _plan()
    alone = [
        engine.generate([engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True)])[0].token_ids
        for a, p in rows
    ]
    # Now stagger: a new request arrives every step while others decode; batch (4) and slots (3)
    # are smaller than the load, so requests wait, join, leave and adapters are evicted on the way.
    sinks = [[] for _ in rows]
    pending = list(range(len(rows)))
    while pending or engine.core.has_work():
        if pending:
            i = pending.pop(0)
            a, p = rows[i]
            engine.submit(engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True), sinks[i])
        engine.core.step()
    staggered = [[t for ev in sink for t in ev.token_ids] for sink in sinks]
    assert staggered == alone
    assert engine.core.bank.table.stats.evictions > 0
    if decode == "static":
        assert engine.core.decode_graphs.stats.static_steps > 0


# The CUDA variant (bf16, plain and nf4) is tests/server/engine/test_mixed_batch_cuda.py.


def test_mixed_batch_matches_peft_in_bf16_on_cpu(tiny_model_dir, adapter_dirs):
    rows = every_kind_rows()
    results = engine_first_tokens(tiny_model_dir, adapter_dirs, "none", rows, "cpu")
    refs = peft_first_tokens(tiny_model_dir, adapter_dirs, "none", rows, "cpu")
    check_rows_match(rows, results, refs)


@pytest.mark.parametrize("mode", ["packed", "separate", "workers", "riding"])
def test_prefill_chunks_and_decodes_in_one_forward_match_peft(tiny_model_dir, adapter_dirs, mode):
    """Requests of every kind arrive one per step with small prefill chunks, so most steps hold both
    prefilling and decoding rows of different kinds: packed (one forward for both, each token a row),
    separate forwards, prefill on worker threads while the engine thread decodes (the decode forward
    and the chunks' forwards at the same time), or packed forwards on the workers (decoding rows riding
    in the prefill jobs while rows are renumbered): every row gives PEFT's tokens and logits."""
    packed = mode in ("packed", "riding")
    rows = _plan()
    refs = _references(tiny_model_dir, adapter_dirs, "none", rows)
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=16,
            max_seq_len=64,
            adapter_slots=len(ADAPTER_KINDS),
            max_prefill_tokens=4,
            packed_steps=packed,
        ),
        capture_logits=True,
    )
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    overlapped = []  # per decode forward: whether a prefill job was running on a worker meanwhile
    partial_decodes = []  # per decode forward: whether it decoded some decoding rows (others riding)
    if mode in ("workers", "riding"):
        engine.core.start_prefill_workers(2)
        runner_decode = engine.core.runner.decode
        engine.core.runner.decode = lambda *a: (
            overlapped.append(any(not job.future.done() for job in engine.core.prefill_jobs))
            or partial_decodes.append(len(a) > 3 and a[3] is not None)
            or runner_decode(*a)
        )
    packed_forwards, packed_threads = [], set()
    runner_packed = engine.core.runner.packed
    engine.core.runner.packed = lambda *a: (
        (packed_forwards.append(len(a[0])) or packed_threads.add(threading.current_thread().name))
        or runner_packed(*a)
    )
    sinks = [[] for _ in rows]
    seqs = []
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        request = engine.request(prompt, adapter=adapter, max_new_tokens=STEPS, ignore_eos=True)
        seqs.append(engine.submit(request, sink))
        engine.core.step()
    while engine.core.has_work():
        engine.core.step()
    engine.core.stop_prefill_workers()
    for (adapter, prompt), seq, sink in zip(rows, seqs, sinks, strict=True):
        want_tokens, want_logits = refs[(adapter, tuple(prompt))]
        assert [t for ev in sink for t in ev.token_ids] == want_tokens, adapter
        got, want = torch.stack(seq.logits), torch.stack(want_logits)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), f"{adapter}: {(got - want).abs().max():.2e}"
    if mode == "packed":  # most steps were mixed, with several decode rows beside the chunks
        assert len(packed_forwards) >= len(rows) and max(packed_forwards) > 3
    elif mode == "riding":  # how many jobs rows rode in depends on the threads' timing
        assert len(packed_forwards) >= 3 and max(packed_forwards) > 2, packed_forwards
    else:
        assert not packed_forwards
    if mode == "workers":  # decode forwards ran while prefill jobs were in flight
        assert any(overlapped), overlapped
    if mode == "riding":  # the packed forwards ran on the workers (test_cpu/prefill_workers.py holds one)
        assert packed_threads and all(name.startswith("adapterserve-prefill") for name in packed_threads)
    else:  # every decode forward took the decoding rows' prefix
        assert not any(partial_decodes)
