"""The engine's own forward is right for every Llama-family architecture it claims: Qwen2 (biased
q/k/v), Mistral and Qwen3 (per-head q/k norms) as well as Llama: the base model and one adapter of
each kind match PEFT in one mixed batch."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter, peft_greedy, peft_reference_model
from tests.helpers.tiny_model import make_tiny_model_dir

KINDS = ("lora_all_r8_rs", "ia3", "prompt", "prefix")
PROMPTS = ([5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12])
STEPS = 5


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3"])
def test_architecture_matches_peft(arch, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / arch, arch=arch)
    dirs = {k: make_adapter(model_dir, k, tmp_path / f"{arch}-{k}", seed=i) for i, k in enumerate(KINDS)}
    base = load_base_model(model_dir, quantize="none", device="cpu")
    assert base.spec.model_type == arch
    engine = OfflineEngine(
        base, EngineSettings(max_batch_size=8, max_seq_len=64, adapter_slots=4), capture_logits=True
    )
    for k, d in dirs.items():
        engine.add_adapter(k, d)
    rows = [(None, PROMPTS[0])] + [(k, PROMPTS[i % len(PROMPTS)]) for i, k in enumerate(KINDS)]
    results = engine.generate(
        [engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in rows]
    )
    for (adapter, prompt), result in zip(rows, results, strict=True):
        ref = peft_reference_model(model_dir, None if adapter is None else dirs[adapter])
        want_tokens, want_logits = peft_greedy(ref, prompt, STEPS)
        assert result.token_ids == want_tokens, (arch, adapter)
        got, want = torch.stack(result.logits), torch.stack(want_logits)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (
            f"{arch}/{adapter}: {(got - want).abs().max():.2e}"
        )
