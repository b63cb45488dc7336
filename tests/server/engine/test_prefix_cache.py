"""Prefix caching (server/engine/prefix_cache.py over the paged cache): a request whose prompt starts with
blocks already computed under the same adapter version takes them and prefills only the rest, and still
gives exactly what PEFT gives; a block is never read for another adapter or another version; n choices
share their prompt's blocks; off, nothing is shared but a prefix-tuning prefix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter, peft_greedy, peft_reference_model

STEPS = 5
SHARED = [(13 * i) % 240 + 5 for i in range(37)]  # a long shared start: 9 whole blocks of 4 and a bit
KINDS = ["lora_qv_r4", "ia3", "prompt", "prefix"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-cache-adapters")
    return {kind: make_adapter(tiny_model_dir, kind, root / kind, seed=i + 1) for i, kind in enumerate(KINDS)}


def _engine(tiny_model_dir, **settings) -> OfflineEngine:
    options = dict(
        max_batch_size=8, max_seq_len=1100, kv_block_size=4, adapter_slots=4, max_prefill_tokens=16
    )
    options.update(settings)
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    return OfflineEngine(base, EngineSettings(**options), capture_logits=True)


def _generate(engine: OfflineEngine, adapter: str | None, prompt: list[int], **kw):
    (result,) = engine.generate(
        [engine.request(prompt, adapter=adapter, max_new_tokens=STEPS, ignore_eos=True, **kw)]
    )
    return result


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_long_prefix_under_every_kind_gives_peft_text_and_hits_on_the_second_ask(
    tiny_model_dir, adapter_dirs, workers
):
    """Base, LoRA, IA3, prompt and prefix tuning each asked twice, interleaved, with a different ending:
    every answer is PEFT's greedy one (logits to 1e-4), and the second ask of each takes its blocks."""
    engine = _engine(tiny_model_dir)
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    if workers:
        engine.core.start_prefill_workers(workers)
    core = engine.core
    models = {
        a: peft_reference_model(tiny_model_dir, None if a is None else adapter_dirs[a])
        for a in [None, *KINDS]
    }
    for ask in range(2):
        for adapter in [None, *KINDS]:
            prompt = SHARED + [7 + ask, 9, 11 + ask]
            hits = core.prefix_cache_hits
            result = _generate(engine, adapter, prompt)
            want_tokens, want_logits = peft_greedy(models[adapter], prompt, STEPS)
            assert result.token_ids == want_tokens, (adapter, ask)
            assert torch.allclose(torch.stack(result.logits), torch.stack(want_logits), atol=1e-4, rtol=0)
            virtual = (
                0
                if adapter is None
                else engine.adapters.resolve(adapter).adapter.info.num_virtual_tokens or 0
            )
            if ask == 1:  # the shared start's whole blocks (virtual tokens in front) were computed by ask 0
                assert core.prefix_cache_hits - hits >= (virtual + len(SHARED)) // 4 * 4, adapter
    core.stop_prefill_workers()
    assert core.cache.free_blocks == core.cache.total_blocks  # cached blocks are reclaimable


def test_a_block_filled_under_one_adapter_is_never_read_for_another_or_for_its_next_version(
    tiny_model_dir, adapter_dirs, tmp_path
):
    engine = _engine(tiny_model_dir)
    core = engine.core
    engine.add_adapter("a", adapter_dirs["lora_qv_r4"])
    engine.add_adapter("b", make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "b", seed=11))
    looked_up: list[list[bytes]] = []
    match = core.cache.match
    core.cache.match = lambda keys: (looked_up.append(list(keys)), match(keys))[1]
    prompt = SHARED + [3]
    _generate(engine, "a", prompt)
    keys_of_a = set(looked_up[-1])  # a's whole chain (its last prompt position aside)
    assert len(keys_of_a) == len(SHARED) // 4
    hits = core.prefix_cache_hits
    got_b = _generate(engine, "b", prompt)
    assert core.prefix_cache_hits == hits  # nothing of a's was taken for b
    assert not keys_of_a & set(looked_up[-1])  # b's chain shares no key with a's
    reference = _engine(tiny_model_dir)
    reference.add_adapter("b", tmp_path / "b")
    assert got_b.token_ids == _generate(reference, "b", prompt).token_ids
    # a's next version (same name, other weights): its chain starts afresh
    engine.add_adapter("a", make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "a2", seed=12))
    hits = core.prefix_cache_hits
    got_a2 = _generate(engine, "a", prompt)
    assert core.prefix_cache_hits == hits and not keys_of_a & set(looked_up[-1])
    reference.add_adapter("a", tmp_path / "a2")
    assert got_a2.token_ids == _generate(reference, "a", prompt).token_ids
    # and the version asked again hits its own blocks
    hits = core.prefix_cache_hits
    assert _generate(engine, "a", prompt).token_ids == got_a2.token_ids
    assert core.prefix_cache_hits - hits == len(SHARED) // 4 * 4


def test_n_choices_over_a_1000_token_prompt_hold_its_blocks_once(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_prefill_tokens=512, kv_block_size=16)
    core = engine.core
    prompt = [(7 * i) % 250 + 3 for i in range(1000)]
    seen: list[tuple[int, int]] = []  # (blocks referenced, blocks shared) at each decode step
    decode = core.runner.decode

    def counting(*args, **kw):
        seen.append((core.cache.total_blocks - core.cache.free_blocks, core.cache.shared_blocks))
        return decode(*args, **kw)

    core.runner.decode = counting
    request = engine.request(prompt, max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=5)
    (result,) = engine.generate([dataclasses.replace(request, n=4)])
    assert len(result.choices) == 4 and all(len(c.token_ids) == 8 for c in result.choices)
    in_use, shared = seen[0]
    full = 1000 // 16  # 62 whole blocks, shared by the 4 choices
    assert shared == full
    # the prompt's blocks once, and per choice its partial last block and the blocks of its new tokens
    assert in_use <= full + 4 * 2


def test_prompt_logprobs_and_scores_are_whole_when_the_prompt_is_cached(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    prompt = SHARED + [4, 5]
    cold = _engine(tiny_model_dir, prefix_cache=False)
    _generate(engine, None, prompt)  # the prompt's blocks are cached now
    request = engine.request(prompt, max_new_tokens=2, ignore_eos=True, logprobs=0)
    (got,) = engine.generate([dataclasses.replace(request, prompt_logprobs=1)])
    cold_request = cold.request(prompt, max_new_tokens=2, ignore_eos=True, logprobs=0)
    (want,) = cold.generate([dataclasses.replace(cold_request, prompt_logprobs=1)])
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(prompt) - 1
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs, strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
    (scored,), (cold_scored,) = engine.score([(prompt, [7, 8])]), cold.score([(prompt, [7, 8])])
    assert scored == pytest.approx(cold_scored, abs=1e-4)


def test_with_the_cache_off_only_a_prefix_tuning_prefix_is_shared(tiny_model_dir, adapter_dirs):
    engine = _engine(tiny_model_dir, prefix_cache=False)
    core = engine.core
    engine.add_adapter("prefix", adapter_dirs["prefix"])
    for _ in range(2):
        _generate(engine, None, SHARED)
    assert core.prefix_cache_hits == 0 and core.cache.cached_blocks == 0
    virtual = engine.adapters.resolve("prefix").adapter.info.num_virtual_tokens
    results = [_generate(engine, "prefix", SHARED + [i]) for i in range(2)]
    assert core.cache.cached_blocks == virtual // 4  # the prefix's whole blocks, nothing of the prompts
    on = _engine(tiny_model_dir)
    on.add_adapter("prefix", adapter_dirs["prefix"])
    assert [r.token_ids for r in results] == [
        _generate(on, "prefix", SHARED + [i]).token_ids for i in range(2)
    ]


def test_a_small_pool_evicts_cached_blocks_and_answers_stay_those_of_no_cache(tiny_model_dir):
    """A pool of 40 blocks of 4 under many different prompts: cached blocks are evicted for new ones
    (least recently used first) and every answer equals the engine without prefix caching."""
    prompts = [[(i * 31 + j * 7) % 200 + 3 for j in range(30)] for i in range(6)] * 2
    block_bytes = 4 * 2 * 2 * 2 * 16 * 4  # tokens x (k, v) x layers x kv heads x head dim x fp32
    outputs = {}
    for on in (True, False):
        engine = _engine(tiny_model_dir, prefix_cache=on, max_seq_len=64, kv_cache_bytes=41 * block_bytes)
        results = [_generate(engine, None, p) for p in prompts]
        outputs[on] = [r.token_ids for r in results]
        if on:
            assert engine.core.cache.total_blocks == 40
            assert engine.core.cache.evictions > 0
    assert outputs[True] == outputs[False]
