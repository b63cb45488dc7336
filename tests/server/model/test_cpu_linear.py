"""oneDNN-packed CPU linears: the same outputs as F.linear up to summation order, the original weights
left in place (tied embeddings, DoRA's norms), and the engine's tokens unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterserve.server.model import cpu_linear
from adapterserve.server.model.cpu_linear import (
    EXACT_ROWS,
    PREFILL_EXACT_ROWS,
    PackedLinear,
    can_pack,
    onednn_linear_available,
    packs_dtype,
    padded_rows,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (5, 1, 96), (3, 11, 96), (65, 96), (7, 43, 96)])
def test_packed_linear_equals_f_linear(dtype, atol, shape):
    if not packs_dtype(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} on this CPU (bf16 needs AVX-512 or AVX-NE-CONVERT)")
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True).to(dtype).requires_grad_(False)
    x = torch.randn(shape).to(dtype)
    packed = PackedLinear(linear)
    got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=1e-5)
    assert packed.weight is linear.weight and packed.bias is linear.bias


@pytest.mark.parametrize("exact", [EXACT_ROWS, PREFILL_EXACT_ROWS])
def test_row_counts_are_padded_to_few_buckets(exact):
    # oneDNN caches a primitive per input shape (torch's ideep cache and oneDNN's own, 1,024 entries
    # each, ~0.55 MB a shape): every distinct row count a prefill makes would stay in memory.
    buckets = {padded_rows(n, exact) for n in range(1, 4097)}
    assert {padded_rows(n, exact) for n in range(1, exact + 1)} == set(range(1, exact + 1))
    doublings = (4096 // exact).bit_length() - 1
    assert len(buckets) <= exact + 8 * doublings  # 8 per doubling above `exact`
    for n in range(1, 4097):
        assert n <= padded_rows(n, exact) < n * 1.125 + 1  # at most 1/8 more rows
        assert padded_rows(padded_rows(n, exact), exact) == padded_rows(n, exact)


def test_packed_linear_runs_onednn_on_bucketed_shapes_only(monkeypatch):
    seen: set[tuple[int, ...]] = set()
    real = cpu_linear._onednn_linear

    def spy(x, packed, bias):
        seen.add(tuple(x.shape))
        return real(x, packed, bias)

    monkeypatch.setattr(cpu_linear, "_onednn_linear", spy)
    linear = nn.Linear(16, 24).requires_grad_(False)
    packed = PackedLinear(linear)
    for rows in range(1, 300):
        for shape in ((rows, 16), (1, rows, 16), (rows, 1, 16)):
            x = torch.randn(shape)
            out = packed(x)
            assert out.shape == (*shape[:-1], 24)
            assert torch.allclose(out, F.linear(x, linear.weight, linear.bias), atol=1e-5)
    assert all(len(s) == 2 for s in seen)
    decode = {padded_rows(n) for n in range(1, 300)}  # [rows, in] and [rows, 1, in]
    prefill = {padded_rows(n, PREFILL_EXACT_ROWS) for n in range(1, 300)}  # [1, rows, in]
    assert {s[0] for s in seen} == decode | prefill
    assert len(seen) < 100


def test_only_plain_frozen_cpu_linears_are_packed():
    frozen = nn.Linear(8, 8).requires_grad_(False)
    assert can_pack(frozen)
    assert not can_pack(nn.Linear(8, 8))  # trainable: a packed copy would go stale
    assert not can_pack(nn.Linear(8, 8).half().requires_grad_(False))  # no fp16 path here
    bf16 = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    assert can_pack(bf16) == packs_dtype(torch.bfloat16)  # an AVX2-only CPU keeps F.linear for bf16
    if not packs_dtype(torch.bfloat16):
        assert cpu_linear.pack(bf16) is bf16


def test_the_engine_packs_on_cpu_and_keeps_tokens_and_tied_weights(tiny_model_dir):
    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.settings import EngineSettings

    outputs, kinds = {}, {}
    for setting in ("torch", "auto"):
        base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
        engine = OfflineEngine(base, EngineSettings(max_batch_size=4, max_seq_len=64, cpu_linear=setting))
        model = base.model
        kinds[setting] = type(model.lm_head).__name__, type(model.model.layers[0].mlp.down_proj.base).__name__
        if setting == "auto" and model.config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight  # tying kept
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
        outputs[setting] = [
            r.token_ids
            for r in engine.generate([engine.request(p, max_new_tokens=6, ignore_eos=True) for p in prompts])
        ]
    assert kinds["torch"] == ("Linear", "Linear") and kinds["auto"] == ("PackedLinear", "PackedLinear")
    assert outputs["auto"] == outputs["torch"]


def test_onednn_required_but_missing_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda: False)
    with pytest.raises(ValueError, match="oneDNN"):
        cpu_linear.use_packed_linears("onednn", torch.device("cpu"))
    assert not cpu_linear.use_packed_linears("auto", torch.device("cpu"))
    assert not cpu_linear.use_packed_linears("auto", torch.device("meta"))
