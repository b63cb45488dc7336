"""oneDNN-packed CPU linears: the same outputs as F.linear up to summation order, the original weights
left in place (tied embeddings, DoRA's norms), and the engine's tokens unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterserve.server.cpu import linear as cpu_linear
from adapterserve.server.cpu.linear import (
    EXACT_ROWS,
    MANY_ROWS,
    PREFILL_EXACT_ROWS,
    LinearRoute,
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
    from adapterserve.server.settings import CpuSettings, EngineSettings

    outputs, kinds = {}, {}
    for setting in ("torch", "onednn", "auto"):
        base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
        engine = OfflineEngine(
            base, EngineSettings(max_batch_size=4, max_seq_len=64, cpu=CpuSettings(linear=setting))
        )
        model = base.model
        kinds[setting] = type(model.lm_head).__name__, type(model.model.layers[0].mlp.down_proj.base).__name__
        if setting == "auto" and model.config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight  # tying kept
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
        outputs[setting] = [
            r.token_ids
            for r in engine.generate([engine.request(p, max_new_tokens=6, ignore_eos=True) for p in prompts])
        ]
    assert kinds["torch"] == ("Linear", "Linear") and kinds["onednn"] == ("PackedLinear", "PackedLinear")
    assert outputs["auto"] == outputs["onednn"] == outputs["torch"]


@pytest.fixture
def fresh_routes(monkeypatch):
    """An empty per-process route cache (the measured routes of earlier tests do not leak in)."""
    monkeypatch.setattr(cpu_linear, "_routes", {})


@pytest.mark.parametrize(
    "few_ratio,many_ratio,want",
    [
        (0.9, 1.2, LinearRoute(few_rows_onednn=True, many_rows_onednn=False)),  # a decode-heavy shape
        (1.4, 1.1, LinearRoute(few_rows_onednn=False, many_rows_onednn=False)),  # F.linear everywhere
        (1.04, 0.5, LinearRoute(few_rows_onednn=True, many_rows_onednn=True)),  # F.linear < 5% faster: oneDNN
    ],
)
def test_the_route_takes_f_linear_only_where_it_is_measured_5_percent_faster(
    monkeypatch, fresh_routes, few_ratio, many_ratio, want
):
    ratios = {cpu_linear.FEW_ROWS_PROBE: few_ratio, cpu_linear.MANY_ROWS_PROBE: many_ratio}
    probed = []

    def fake(weight, packed, rows):  # oneDNN's time over F.linear's
        probed.append(rows)
        return ratios[rows]

    monkeypatch.setattr(cpu_linear, "_onednn_seconds_over_f_linear", fake)
    linear = nn.Linear(32, 48).requires_grad_(False)
    assert cpu_linear.measured_route(linear) == want
    assert cpu_linear.measured_route(nn.Linear(32, 48).requires_grad_(False)) == want  # once per shape
    assert sorted(probed) == [cpu_linear.FEW_ROWS_PROBE, cpu_linear.MANY_ROWS_PROBE]
    packed = cpu_linear.pack(linear, "auto")
    assert (packed is linear) == (not want.packs)  # no packed copy where oneDNN never runs
    assert isinstance(cpu_linear.pack(linear, "onednn"), PackedLinear)


def test_measuring_a_route_times_both_kernels_and_leaves_the_callers_threads(fresh_routes):
    threads = torch.get_num_threads()
    linear = nn.Linear(64, 96).requires_grad_(False)
    rng = torch.get_rng_state()
    route = cpu_linear.measured_route(linear)
    assert isinstance(route, LinearRoute)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)  # seeded draws after an engine start are unchanged
    assert "64->96 float32" in cpu_linear.describe_routes()


def test_a_shape_that_cannot_be_timed_keeps_onednn_and_routes_of_two_dtypes_are_described(
    monkeypatch, fresh_routes, caplog
):
    def broken(weight, packed, rows):
        raise RuntimeError("no timer here")

    monkeypatch.setattr(cpu_linear, "_onednn_seconds_over_f_linear", broken)
    assert cpu_linear.measured_route(nn.Linear(8, 16).requires_grad_(False)) == cpu_linear.ALWAYS_ONEDNN
    assert "timing the CPU linear (16, 8) failed" in caplog.text
    cpu_linear._routes[(16, 8, torch.bfloat16)] = LinearRoute(few_rows_onednn=False, many_rows_onednn=False)
    assert cpu_linear.describe_routes() == "8->16 bfloat16: F.linear; 8->16 float32: oneDNN"


def test_a_routed_linear_runs_each_row_count_on_its_kernel(monkeypatch):
    calls: list[int] = []
    real = cpu_linear._onednn_linear

    def spy(x, packed, bias):
        calls.append(x.shape[0])
        return real(x, packed, bias)

    monkeypatch.setattr(cpu_linear, "_onednn_linear", spy)
    linear = nn.Linear(16, 24).requires_grad_(False)
    routed = PackedLinear(linear, LinearRoute(few_rows_onednn=True, many_rows_onednn=False))
    for shape in ((1, 16), (MANY_ROWS - 1, 16), (4, 1, 16), (1, MANY_ROWS, 16), (3, 40, 16), (MANY_ROWS, 16)):
        calls.clear()
        x = torch.randn(shape)
        out = routed(x)
        assert torch.allclose(out, F.linear(x, linear.weight, linear.bias), atol=1e-5)
        rows = x.numel() // 16
        assert bool(calls) == (rows < MANY_ROWS)  # decode-sized calls on oneDNN, prefills on F.linear


def test_prefill_plans_count_padding_only_where_prefill_runs_on_onednn(
    monkeypatch, tiny_model_dir, fresh_routes
):
    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.settings import CpuSettings, EngineSettings

    for many_onednn in (True, False):
        cpu_linear._routes.clear()
        route = LinearRoute(few_rows_onednn=True, many_rows_onednn=many_onednn)
        monkeypatch.setattr(cpu_linear, "_time_route", lambda weight, route=route: route)
        base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
        engine = OfflineEngine(
            base, EngineSettings(max_batch_size=4, max_seq_len=64, cpu=CpuSettings(linear="auto"))
        )
        assert (engine.core.prefill_positions is not None) == many_onednn
        got = engine.generate([engine.request([5, 6, 7, 8] * 10, max_new_tokens=4, ignore_eos=True)])
        assert len(got[0].token_ids) == 4


def test_onednn_required_but_missing_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda: False)
    with pytest.raises(ValueError, match="oneDNN"):
        cpu_linear.use_packed_linears("onednn", torch.device("cpu"))
    assert not cpu_linear.use_packed_linears("auto", torch.device("cpu"))
    assert not cpu_linear.use_packed_linears("auto", torch.device("meta"))
