"""Scoring requests: the engine's log-probabilities of a continuation equal PEFT's forward log-probs,
for every adapter kind, in a batch mixed with generating requests and with chunked prefill."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.scoring import scored_positions
from adapterserve.server.engine.types import FinishReason
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter, peft_reference_model

KINDS = ("lora_qv_r4", "ia3", "prompt", "ptuning", "prefix")
PAIRS = [([5, 6, 7, 8, 9], [40, 41, 42]), ([100, 17], [250, 3, 77, 12, 9, 60, 61])]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("score-adapters")
    return {kind: make_adapter(tiny_model_dir, kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}


@torch.inference_mode()
def peft_logprobs(model, prompt: list[int], continuation: list[int]) -> list[float]:
    ids = torch.tensor([prompt + continuation])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logits = logits[-ids.shape[1] :]  # prompt tuning returns its virtual positions first
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    return [float(logprobs[start + i - 1, tok]) for i, tok in enumerate(continuation)]


def test_scored_positions_cover_each_scored_token_once_across_chunks():
    # 3 virtual inputs, a 6-token prompt, the last 4 scored: predicted by inputs 3+2-1 .. 3+5-1 = 4..7.
    seen = [p for start in range(0, 9, 2) for p in scored_positions(start, 2, 3, 6, 4)]
    assert seen == [4, 5, 6, 7]


@pytest.mark.parametrize("prefill_budget", [512, 3])
def test_engine_scores_equal_peft_forward_for_every_kind(tiny_model_dir, adapter_dirs, prefill_budget):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(base, EngineSettings(max_prefill_tokens=prefill_budget))
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    plan = [(None, pair) for pair in PAIRS] + [(kind, PAIRS[i % 2]) for i, kind in enumerate(KINDS)]
    requests = [
        replace(engine.request(prompt + cont, adapter=adapter), score_tokens=len(cont))
        for adapter, (prompt, cont) in plan
    ]
    generating = engine.request([60, 61, 62], adapter="lora_qv_r4", max_new_tokens=4)
    results = engine.generate([generating, *requests])
    assert results[0].finish_reason == FinishReason.LENGTH and len(results[0].token_ids) == 4
    for (adapter, (prompt, cont)), result in zip(plan, results[1:], strict=True):
        assert result.finish_reason == FinishReason.SCORED and result.token_ids == []
        reference = peft_logprobs(
            peft_reference_model(tiny_model_dir, None if adapter is None else adapter_dirs[adapter]),
            prompt,
            cont,
        )
        assert len(result.logprobs) == len(cont)
        assert result.logprobs == pytest.approx(reference, abs=1e-4), adapter
    # Scores differ between adapters: the adapter was applied.
    by_adapter = {a: r.logprobs for (a, (p, _)), r in zip(plan, results[1:], strict=True) if p == PAIRS[0][0]}
    assert by_adapter[None] != pytest.approx(by_adapter["lora_qv_r4"], abs=1e-3)


def test_score_helper_and_refusals(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(base, EngineSettings(max_seq_len=32))
    [scores] = engine.score([([5, 6], [7, 8, 9])])
    assert len(scores) == 3 and all(s < 0 for s in scores)
    with pytest.raises(InvalidArgumentError, match="score_tokens"):
        engine.score([([], [7, 8])])  # nothing before the first scored token
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        engine.score([([5] * 20, [6] * 20)])
