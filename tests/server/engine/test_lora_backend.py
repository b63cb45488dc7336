"""lora_backend "triton": a mixed batch of LoRA-like adapters served through the Triton kernels gives what
the torch backend gives, and each row still equals PEFT with its adapter alone.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a CUDA host this file runs the torch backend and checks the refusal only,
and test_lora_kernels.py runs the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.adapters.kernels import KernelBackendError
from adapterserve.server.adapters.kernels.base import triton_interpreting
from adapterserve.server.engine.core import EngineCore
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter, peft_greedy, peft_reference_model

STEPS = 4
# Every kind that goes through LowRankSlots (LoRA, AdaLoRA as LoRA, DoRA, bottleneck), and IA3: its
# slots are zero in the low-rank tensors, as slot 0 is.
KINDS = ("lora_qv_r4", "lora_all_r8_rs", "adalora_pruned", "dora", "bottleneck_houlsby", "ia3")
ROWS = [
    (None, [5, 6, 7, 8, 9]),
    ("lora_qv_r4", [40, 41, 42]),
    ("lora_all_r8_rs", [100, 17, 250, 3, 77, 12, 9]),
    ("adalora_pruned", [60, 61]),
    ("dora", [5, 6, 7, 8, 9]),
    ("bottleneck_houlsby", [40, 41, 42]),
    ("ia3", [60, 61]),
    ("lora_qv_r4", [100, 17, 250]),
]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-backend-adapters")
    return {
        kind: make_adapter(tiny_model_dir, kind, root / kind, seed=10 + i) for i, kind in enumerate(KINDS)
    }


def _serve(tiny_model_dir, adapter_dirs, backend: str):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=8, max_seq_len=64, adapter_slots=len(KINDS), lora_backend=backend),
        capture_logits=True,
    )
    assert engine.core.bank.kernels.name == backend
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    return engine.generate(
        [engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in ROWS]
    )


@pytest.mark.skipif(not triton_interpreting(), reason="runs the kernels in Triton's CPU interpreter")
def test_triton_backend_serves_a_mixed_batch_as_torch_and_peft(tiny_model_dir, adapter_dirs):
    pytest.importorskip("triton", reason="the triton backend needs the triton package (the dev extra)")
    with_torch = _serve(tiny_model_dir, adapter_dirs, "torch")
    with_triton = _serve(tiny_model_dir, adapter_dirs, "triton")
    for (adapter, prompt), a, b in zip(ROWS, with_torch, with_triton, strict=True):
        assert b.token_ids == a.token_ids, f"{adapter}: triton {b.token_ids} != torch {a.token_ids}"
        got, want = torch.stack(b.logits), torch.stack(a.logits)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{adapter}: {(got - want).abs().max():.2e}"
        ref_tokens, ref_logits = peft_greedy(
            peft_reference_model(tiny_model_dir, None if adapter is None else adapter_dirs[adapter]),
            prompt,
            STEPS,
        )
        assert b.token_ids == ref_tokens, f"{adapter}: triton {b.token_ids} != PEFT {ref_tokens}"
        diff = (got - torch.stack(ref_logits)).abs().max()
        assert diff <= 1e-4, f"{adapter}: max logit diff to PEFT {diff:.2e}"


def test_triton_backend_is_refused_at_engine_start_off_cuda(tiny_base, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelBackendError, match="CUDA devices only|needs the triton package"):
        EngineCore(tiny_base, EngineSettings(max_batch_size=2, max_seq_len=32, lora_backend="triton"))
