"""The correctness invariant on the embedded default model (SmolLM2-135M-Instruct), every kind."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import (
    ADAPTER_KINDS,
    make_adapter,
    peft_greedy,
    peft_reference_model,
    reference_prompt,
)

pytestmark = pytest.mark.smollm2
STEPS = 6


def test_every_kind_matches_peft_on_smollm2(smollm2_dir, tmp_path):
    base = load_base_model(smollm2_dir, quantize="none", device="cpu")
    tok = base.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in ("What is the capital of France?", "Name a color.", "Say hi.")
    ]
    kinds = list(ADAPTER_KINDS)
    dirs = {k: make_adapter(smollm2_dir, k, tmp_path / k, seed=i) for i, k in enumerate(kinds)}
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=16, max_seq_len=160, adapter_slots=len(kinds)),
        capture_logits=True,
    )
    for k, d in dirs.items():
        engine.add_adapter(k, d)
    rows = [(None, prompts[0])] + [(k, prompts[i % len(prompts)]) for i, k in enumerate(kinds)]
    results = engine.generate(
        [engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in rows]
    )
    assert "Paris" in results[0].text
    for (adapter, prompt), result in zip(rows, results, strict=True):
        adapter_dir = None if adapter is None else dirs[adapter]
        ref_model = peft_reference_model(smollm2_dir, adapter_dir)
        want_tokens, want_logits = peft_greedy(
            ref_model, reference_prompt(smollm2_dir, adapter_dir, prompt), STEPS
        )
        assert result.token_ids == want_tokens, adapter
        got, want = torch.stack(result.logits), torch.stack(want_logits)
        # fp32 logits of magnitude ~20 after 30 layers; the engine's oneDNN-packed linears
        # (cpu_linear="auto") sum in another order than PEFT's F.linear: ~2e-3 apart, tokens identical
        assert torch.allclose(got, want, atol=5e-3, rtol=1e-4), f"{adapter}: {(got - want).abs().max():.2e}"
        del ref_model
