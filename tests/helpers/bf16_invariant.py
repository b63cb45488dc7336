"""The bf16 invariant shared by the CPU and the CUDA tests: each row of one mixed batch (base rows and
every adapter kind) against PEFT's PeftModel with that adapter alone, on the same device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import ADAPTER_KINDS, peft_greedy, peft_reference_model, reference_prompt

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9], [60, 61]]
Rows = list[tuple[str | None, list[int]]]


def bf16_tolerance(reference: torch.Tensor) -> float:
    """bf16: 4e-2 of the logits' scale (at least 4e-2)."""
    return 1e-2 * max(1.0, float(reference.abs().max())) * 4


def every_kind_rows() -> Rows:
    """Two base rows, then one row per adapter kind."""
    rows: Rows = [(None, PROMPTS[0]), (None, PROMPTS[2])]
    rows += [(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(ADAPTER_KINDS)]
    return rows


def engine_first_tokens(
    model_dir: Path, adapter_dirs: dict[str, Path], quantize: str, rows: Rows, device: str
):
    """One mixed batch of `rows` in the engine over a bf16 base: two tokens each, logits kept."""
    base = load_base_model(model_dir, quantize=quantize, device=device, dtype="bfloat16")
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=16, max_seq_len=64, adapter_slots=len(ADAPTER_KINDS)),
        capture_logits=True,
    )
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    return engine.generate([engine.request(p, adapter=a, max_new_tokens=2, ignore_eos=True) for a, p in rows])


def peft_first_tokens(model_dir: Path, adapter_dirs: dict[str, Path], quantize: str, rows: Rows, device: str):
    """PEFT's (tokens, logits) of one greedy step for each row, its adapter alone, over a bf16 base."""
    out = []
    for adapter, prompt in rows:
        adapter_dir = None if adapter is None else adapter_dirs[adapter]
        ref = peft_reference_model(model_dir, adapter_dir, quantize, device=device, dtype="bfloat16")
        out.append(peft_greedy(ref, reference_prompt(model_dir, adapter_dir, prompt), 1))
    return out


def check_rows_match(rows: Rows, results, refs) -> None:
    """First-token logits within the bf16 tolerance and greedy tokens equal, row by row."""
    for (adapter, _), result, (want_tokens, want_logits) in zip(rows, results, refs, strict=True):
        diff = float((result.logits[0] - want_logits[0]).abs().max())
        assert diff <= bf16_tolerance(want_logits[0]), f"{adapter}: max logit diff {diff:.3e}"
        assert result.token_ids[0] == want_tokens[0], adapter
