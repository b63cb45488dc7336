"""n choices from one prefill (engine/fork.py), prompt logprobs during the prefill, and the OpenAI
processors inside the running engine, on the tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.types import FinishReason
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]  # > one KV block


@pytest.fixture
def base(tiny_model_dir):  # one per engine (an engine wraps the model's linears in place)
    return load_base_model(tiny_model_dir, quantize="none", device="cpu")


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path_factory.mktemp("choices") / "lora", seed=1)


@pytest.mark.parametrize("kv_cache", ["paged", "dense"])
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_n_choices_share_one_prefill_and_match_single_requests(base, lora_dir, kv_cache, adapter):
    engine = OfflineEngine(base, EngineSettings(kv_cache=kv_cache, max_batch_size=8))
    engine.add_adapter("lora", lora_dir)
    sampling = dict(max_new_tokens=6, temperature=1.0, seed=42, ignore_eos=True, logprobs=2)
    request = replace(engine.request(PROMPT, adapter=adapter, **sampling), n=4)
    other = engine.request([30, 31], max_new_tokens=5)  # another request in the same batch
    [result, plain] = engine.generate([request, other])
    stats = engine.core.stats()
    assert stats.prefilled_prompts == 2 and stats.forked_choices == 3  # one prefill for 4 choices
    assert plain.finish_reason == FinishReason.LENGTH
    assert len(result.choices) == 4
    for _i, choice in enumerate(result.choices):
        assert choice.finish_reason == FinishReason.LENGTH and len(choice.token_ids) == 6
        assert [lp.token_id for lp in choice.token_logprobs] == choice.token_ids
    # choice i is the request with seed 42 + i on its own (its own prefill)
    singles = engine.generate(
        [engine.request(PROMPT, adapter=adapter, **{**sampling, "seed": 42 + i}) for i in range(4)]
    )
    for choice, single in zip(result.choices, singles, strict=True):
        assert choice.token_ids == single.token_ids
        for a, b in zip(choice.token_logprobs, single.token_logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # the seeds differ


def test_n_waits_for_rows_and_failed_parents_end_every_choice(base):
    engine = OfflineEngine(base, EngineSettings(max_batch_size=4))
    first = engine.request([40, 41], max_new_tokens=3)
    request = replace(engine.request(PROMPT, max_new_tokens=3, ignore_eos=True), n=4)
    results = engine.generate([first, request])  # 4 rows: it waits until the first request is done
    assert [len(c.token_ids) for c in results[1].choices] == [3, 3, 3, 3]
    assert len({tuple(c.token_ids) for c in results[1].choices}) == 1  # greedy: all equal
    with pytest.raises(InvalidArgumentError, match="n: 5 choices"):
        engine.submit(replace(request, n=5), [])
    # cancelled while waiting: every choice gets its final event
    sink: list = []
    engine.submit(replace(request, request_id="gone"), sink)
    engine.core.cancel("gone")
    while engine.core.has_work():
        engine.core.step()
    assert sorted(e.index for e in sink if e.finish_reason is FinishReason.CANCELLED) == [0, 1, 2, 3]


@pytest.mark.parametrize("budget", [512, 4])
def test_prompt_logprobs_equal_the_score_path(base, budget):
    engine = OfflineEngine(base, EngineSettings(max_prefill_tokens=budget))
    [scores] = engine.score([(PROMPT[:1], PROMPT[1:])])
    request = replace(engine.request(PROMPT, max_new_tokens=2, logprobs=0), prompt_logprobs=3)
    [result] = engine.generate([request])
    assert [lp.token_id for lp in result.prompt_logprobs] == PROMPT[1:]
    assert [lp.logprob for lp in result.prompt_logprobs] == pytest.approx(list(scores), abs=1e-5)
    assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.logprob - 1e-6 for lp in result.prompt_logprobs)
    # a scoring request can carry them too (echo with no generated tokens)
    scoring = replace(engine.request(PROMPT), score_tokens=len(PROMPT) - 1, prompt_logprobs=1)
    [scored] = engine.generate([scoring])
    assert scored.finish_reason == FinishReason.SCORED
    assert list(scored.logprobs) == pytest.approx(list(scores), abs=1e-5)
    assert len(scored.prompt_logprobs) == len(PROMPT) - 1


def test_min_tokens_holds_back_eos_in_the_engine(base):
    engine = OfflineEngine(base)
    eos = sorted(engine.core.eos_ids)[0]
    bias = ((eos, 100.0),)
    [early, held] = engine.generate(
        [
            engine.request(PROMPT, max_new_tokens=8, logit_bias=bias),
            engine.request(PROMPT, max_new_tokens=8, logit_bias=bias, min_tokens=5),
        ]
    )
    assert early.finish_reason == FinishReason.EOS and early.token_ids == [eos]
    assert (
        held.finish_reason == FinishReason.EOS and len(held.token_ids) == 6 and eos not in held.token_ids[:5]
    )
    with pytest.raises(InvalidArgumentError, match="min_tokens"):
        engine.submit(engine.request(PROMPT, max_new_tokens=2, min_tokens=3), [])
