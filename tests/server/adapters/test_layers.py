"""Per-kind row subsets in a mixed batch: a kind with rows in at most half of the batch runs its hooks on
those rows only. The rows of other kinds see that kind's hooks as the identity, so the forward must give
what running every hook over every row gives: bit for bit on rows without an adapter, and up to float32
summation order on a kind's rows (a subset of one slot uses a plain matmul instead of the gathered one)."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.adapters import layers
from adapterserve.server.adapters.layers import build_batch
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.bf16_invariant import every_kind_rows
from tests.helpers.peft_refs import ADAPTER_KINDS, make_every_kind


def test_build_batch_gives_a_kind_its_rows_when_it_holds_at_most_half():
    # slots 1, 2: LoRA; 3: IA3; 0: no adapter.  rows: lora, base, ia3, lora, base, base
    batch = build_batch([1, 0, 3, 2, 0, 0], {1: "lora", 2: "lora", 3: "ia3"}, torch.device("cpu"))
    assert batch.kinds == {"lora", "ia3"}
    assert set(batch.subsets) == {"lora", "ia3"}
    lora_rows, lora = batch.subsets["lora"]
    assert lora_rows.tolist() == [0, 3] and lora.slots.tolist() == [1, 2] and lora.single_slot is None
    ia3_rows, ia3 = batch.subsets["ia3"]
    assert ia3_rows.tolist() == [2] and ia3.single_slot == 3 and ia3.kinds == {"ia3"}
    # more than half of the rows: the kind's hooks run over the whole batch
    most = build_batch([1, 1, 2, 0], {1: "lora", 2: "lora"}, torch.device("cpu"))
    assert most.subsets == {}


def _run(model_dir, adapter_dirs, rows):
    base = load_base_model(model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=16, max_seq_len=64, adapter_slots=len(ADAPTER_KINDS)),
        capture_logits=True,
    )
    for kind, path in adapter_dirs.items():
        engine.add_adapter(kind, path)
    results = engine.generate(
        [engine.request(p, adapter=a, max_new_tokens=4, ignore_eos=True) for a, p in rows]
    )
    return [(r.token_ids, torch.stack(r.logits)) for r in results]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    return make_every_kind(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


def test_row_subsets_give_the_same_logits_as_every_hook_on_every_row(
    tiny_model_dir, adapter_dirs, monkeypatch
):
    rows = every_kind_rows()  # two base rows and one row of each kind: every kind is a subset
    used: list[int] = []
    original = layers.build_batch

    def counting(*args):
        batch = original(*args)
        used.append(len(batch.subsets))
        return batch

    monkeypatch.setattr("adapterserve.server.engine.core.build_batch", counting)
    with_subsets = _run(tiny_model_dir, adapter_dirs, rows)
    assert max(used) >= 3  # several kinds ran on their own rows

    def whole_rows(*args):
        batch = original(*args)
        batch.subsets.clear()
        return batch

    monkeypatch.setattr("adapterserve.server.engine.core.build_batch", whole_rows)
    everywhere = _run(tiny_model_dir, adapter_dirs, rows)
    for (adapter, _), (tokens, logits), (want_tokens, want_logits) in zip(
        rows, with_subsets, everywhere, strict=True
    ):
        assert tokens == want_tokens, adapter
        if adapter is None:
            assert torch.equal(logits, want_logits)
        else:
            assert torch.allclose(logits, want_logits, atol=1e-5, rtol=0), (
                f"{adapter}: {(logits - want_logits).abs().max():.2e}"
            )
