"""The decode step captured as CUDA graphs equals the eager step and PEFT (skipped without a GPU).

Two engines over the same tiny bf16 model (plain and nf4): eager decode steps and CUDA-graph replays,
the same mixed batch of every adapter kind, several decode steps. Their trajectories must agree: equal
tokens, and logits within the bf16 tolerance, up to a first differing token, which is only allowed at a
near-tie of the eager step's top two logits (padded batch sizes may pick other GEMM kernels). The first
tokens are also held against PEFT (the prefill is eager in both). Then requests join and leave (row
buckets change, adapters are evicted and reloaded) and the graph engine must still match.
"""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.bnb_dispatch import pinned_if_nf4
from tests.helpers.peft_refs import (
    ADAPTER_KINDS,
    make_every_kind,
    peft_greedy,
    peft_reference_model,
    reference_prompt,
)

pytestmark = pytest.mark.cuda
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9], [60, 61]]
STEPS = 8


def _tolerance(reference: torch.Tensor) -> float:
    return 4e-2 * max(1.0, float(reference.abs().max()))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-adapters")
    return make_every_kind(tiny_model_dir, root)


def _rows():
    rows = [(None, PROMPTS[0]), (None, PROMPTS[2])]
    rows += [(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(ADAPTER_KINDS)]
    return rows


def _engine(tiny_model_dir, adapter_dirs, quantize, decode_step, **overrides):
    base = load_base_model(tiny_model_dir, quantize=quantize, device="cuda", dtype="bfloat16")
    settings = {"max_batch_size": 16, "max_seq_len": 64, "adapter_slots": len(ADAPTER_KINDS)} | overrides
    engine = OfflineEngine(base, EngineSettings(decode_step=decode_step, **settings), capture_logits=True)
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    return engine


def _assert_same_trajectory(name, eager, graphs):
    """Equal tokens and close logits until a first difference, which must sit at an eager near-tie."""
    for step, (want_token, got_token, want, got) in enumerate(
        zip(eager.token_ids, graphs.token_ids, eager.logits, graphs.logits, strict=False)
    ):
        diff = float((got.float() - want.float()).abs().max())
        assert diff <= _tolerance(want), f"{name} step {step}: max logit diff {diff:.3e}"
        if got_token != want_token:
            top2 = torch.topk(want.float(), 2).values
            margin = float(top2[0] - top2[1])
            assert margin <= 2 * diff, (
                f"{name} step {step}: tokens differ at margin {margin:.3e} > 2x{diff:.3e}"
            )
            return


@pytest.mark.parametrize("quantize,lora_backend", [("none", "torch"), ("nf4", "torch"), ("none", "triton")])
def test_graph_replays_match_eager_steps_and_peft(tiny_model_dir, adapter_dirs, quantize, lora_backend):
    """triton: the gathered LoRA kernels inside the captured graph, against the eager torch step."""
    rows = _rows()
    with pinned_if_nf4(quantize):
        eager = _engine(tiny_model_dir, adapter_dirs, quantize, "eager")
        want = eager.generate(
            [eager.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in rows]
        )
        graphs = _engine(tiny_model_dir, adapter_dirs, quantize, "graphs", lora_backend=lora_backend)
        got = graphs.generate(
            [graphs.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True) for a, p in rows]
        )
        stats = graphs.core.decode_graphs.stats
        print(f"decode graphs ({quantize}, {lora_backend}):", stats)
        assert stats.disabled is None, stats.disabled
        assert stats.captures >= 1 and stats.replays >= STEPS - 1 and stats.static_steps == 0
        for (adapter, _), e, g in zip(rows, want, got, strict=True):
            _assert_same_trajectory(f"{adapter}/{quantize}", e, g)
        for (adapter, prompt), g in list(zip(rows, got, strict=True))[:4]:
            ref = peft_reference_model(
                tiny_model_dir,
                None if adapter is None else adapter_dirs[adapter],
                quantize,
                device="cuda",
                dtype="bfloat16",
            )
            adapter_dir = None if adapter is None else adapter_dirs[adapter]
            tokens, logits = peft_greedy(ref, reference_prompt(tiny_model_dir, adapter_dir, prompt), 1)
            assert float((g.logits[0].float() - logits[0].float()).abs().max()) <= _tolerance(logits[0])


@pytest.mark.parametrize("max_graphs", [64, 2])
def test_graphs_follow_joining_rows_and_adapter_reloads(tiny_model_dir, adapter_dirs, max_graphs):
    """Requests join every step (row buckets change, prefilling rows sit behind the padded decode rows)
    and 3 slots serve 7 adapters (slots are rewritten, some tensors grow: graphs are recaptured). With
    max_graphs=2, graphs are also dropped one at a time from the shared pool while others stay."""
    rows = _rows()
    results = {}
    for mode in ("eager", "graphs"):
        engine = _engine(
            tiny_model_dir, {}, "none", mode, adapter_slots=3, max_batch_size=4, max_decode_graphs=max_graphs
        )
        for kind, path in adapter_dirs.items():
            engine.add_adapter(kind, path)
        sinks = [[] for _ in rows]
        pending = list(range(len(rows)))
        while pending or engine.core.has_work():
            if pending:
                i = pending.pop(0)
                a, p = rows[i]
                engine.submit(engine.request(p, adapter=a, max_new_tokens=STEPS, ignore_eos=True), sinks[i])
            engine.core.step()
        results[mode] = [[t for ev in sink for t in ev.token_ids] for sink in sinks]
        if mode == "graphs":
            stats = engine.core.decode_graphs.stats
            print("decode graphs (joining):", stats)
            assert stats.disabled is None and stats.replays > 0
            assert engine.core.bank.table.stats.evictions > 0
            if max_graphs == 2:
                assert stats.evictions > 0 and len(engine.core.decode_graphs.graphs) <= 2
    same = sum(a == b for a, b in zip(results["eager"], results["graphs"], strict=True))
    assert same >= len(rows) - 1, (results["eager"], results["graphs"])  # bf16: allow one near-tie row
