"""The triton backend equals the torch reference (and both equal an fp64 product) for mixed slots.

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): the same kernel code, executed with numpy. On a CUDA
host the same tests run the compiled kernels on the GPU, and the `cuda` tests add a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.adapters.kernels import KernelBackendError, lora_kernels
from adapterserve.server.adapters.kernels.base import triton_interpreting

pytest.importorskip("triton", reason="the triton backend needs the triton package (the dev extra has it)")

# Where the kernels run here: the CPU interpreter, else the GPU.
DEVICE = "cpu" if triton_interpreting() else "cuda"
needs_device = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="neither a GPU nor TRITON_INTERPRET=1 (tests/conftest.py sets it where there is no GPU)",
)

# Tolerance of each dtype against the fp64 product, relative to the result's scale.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _slot_tensors(num_slots: int, in_dim: int, r_cap: int, out_dim: int, ranks: list[int], dtype, device):
    """a [S, in, r_cap], b [S, r_cap, out]: slot 0 all zeros, slot i of rank ranks[i-1] zero-padded."""
    gen = torch.Generator().manual_seed(1234)
    a = torch.zeros(num_slots, in_dim, r_cap, dtype=torch.float64)
    b = torch.zeros(num_slots, r_cap, out_dim, dtype=torch.float64)
    for slot, rank in enumerate(ranks, start=1):
        a[slot, :, :rank] = torch.randn(in_dim, rank, generator=gen, dtype=torch.float64) / in_dim**0.5
        b[slot, :rank, :] = torch.randn(rank, out_dim, generator=gen, dtype=torch.float64)
    return a.to(device, dtype), b.to(device, dtype)


def _check(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(want64.abs().max()))
    err = float((got.double() - want64).abs().max())
    assert err <= RTOL[dtype] * scale, f"{dtype}: max error {err:.3e} (scale {scale:.2f})"


def _compare(
    batch: int, seq: int, in_dim: int, out_dim: int, r_cap: int, dtype: torch.dtype, device: str = DEVICE
):
    ranks = [r_cap, max(1, r_cap // 2), 1, r_cap - 1 or 1]  # slots 1..4; some padded
    a, b = _slot_tensors(len(ranks) + 1, in_dim, r_cap, out_dim, ranks, dtype, device)
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    slots = torch.randint(0, len(ranks) + 1, (batch,), generator=gen)
    slots[0] = 0  # a base row among adapter rows
    if batch > 2:
        slots[1] = 3
    slots = slots.to(device)
    x = torch.randn(batch, seq, in_dim, generator=gen, dtype=torch.float64).to(device, dtype)
    ref, tri = lora_kernels("torch"), lora_kernels("triton", device)

    h_ref, h_tri = ref.shrink(x, a, slots), tri.shrink(x, a, slots)
    assert h_tri.shape == (batch, seq, r_cap) and h_tri.dtype == dtype
    h64 = torch.einsum("bsi,bir->bsr", x.double(), a.double()[slots])
    _check(h_ref, h64, dtype)
    _check(h_tri, h64, dtype)

    y_ref, y_tri = ref.expand(h_ref, b, slots), tri.expand(h_ref, b, slots)  # the same input to both
    assert y_tri.shape == (batch, seq, out_dim) and y_tri.dtype == dtype
    y64 = torch.einsum("bsr,bro->bso", h_ref.double(), b.double()[slots])
    _check(y_ref, y64, dtype)
    _check(y_tri, y64, dtype)
    base_rows = slots == 0
    assert not h_tri[base_rows].any() and not y_tri[base_rows].any()  # slot 0: exactly zero
    return x, a, b, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,seq,in_dim,out_dim,r_cap",
    [
        (1, 1, 70, 100, 16),  # T = 1 (one decoding row)
        (64, 1, 200, 300, 8),  # T = 64 decoding rows; in/out not multiples of any block size
        (3, 5, 64, 48, 4),  # prefill-shaped rows: the slot is per row, shared by its tokens
        (4, 2, 33, 130, 128),  # rank 128: shrink's K tile shrinks, expand loops over rank tiles
    ],
)
@needs_device
def test_triton_equals_torch(dtype, batch, seq, in_dim, out_dim, r_cap):
    _compare(batch, seq, in_dim, out_dim, r_cap, dtype)


@needs_device
def test_single_slot_and_strided_inputs():
    x, a, b, slots = _compare(4, 3, 40, 24, 8, torch.float32)
    tri, ref = lora_kernels("triton", DEVICE), lora_kernels("torch")
    # Every row one slot: a plain matmul on the slot's view, as the reference does.
    torch.testing.assert_close(tri.shrink(x, a, slots, 2), ref.shrink(x, a, slots, 2))
    torch.testing.assert_close(tri.expand(x[..., :8], b, slots, 2), ref.expand(x[..., :8], b, slots, 2))
    # A non-contiguous input (strided rows) is read through its strides.
    wide = torch.randn(4, 3, 80, device=DEVICE)
    strided = wide[:, :, ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        tri.shrink(strided, a, slots), ref.shrink(strided, a, slots), rtol=1e-5, atol=1e-5
    )
    # An empty batch gives an empty result.
    assert tri.shrink(x[:0], a, slots[:0]).shape == (0, 3, 8)


def test_triton_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelBackendError, match="CUDA devices only"):
        lora_kernels("triton", "cpu")
    with pytest.raises(KernelBackendError, match="not one of"):
        lora_kernels("cutlass", "cpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(KernelBackendError, match="needs the triton package"):
        lora_kernels("triton", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_torch_on_cuda(dtype):
    _compare(64, 1, 2048, 512, 16, dtype, "cuda")
    _compare(1, 1, 2048, 2048, 8, dtype, "cuda")
    _compare(5, 7, 200, 300, 16, dtype, "cuda")


@pytest.mark.cuda
def test_triton_kernels_capture_in_a_cuda_graph():
    dtype, device = torch.bfloat16, "cuda"
    a, b = _slot_tensors(9, 256, 16, 384, [16, 8, 4, 16, 1, 2, 3, 16], dtype, device)
    tri, ref = lora_kernels("triton", device), lora_kernels("torch")
    x = torch.randn(32, 1, 256, device=device, dtype=dtype)
    slots = torch.randint(0, 9, (32,), device=device)
    tri.expand(tri.shrink(x, a, slots), b, slots)  # warm up (compiles) before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tri.expand(tri.shrink(x, a, slots), b, slots)
    for _ in range(2):  # new inputs and slots, same buffers: the replay follows them
        x.copy_(torch.randn_like(x))
        slots.copy_(torch.randint(0, 9, (32,), device=device))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.expand(ref.shrink(x, a, slots), b, slots)
        _check(y, want.double(), dtype)
