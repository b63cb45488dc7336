"""The torch reference backend on a CPU (no triton needed): each row's product with its own slot, in
every dtype; and the bank's linear slots in float32 over a half-precision base on a CPU (the precision
PEFT computes these adapters in, and the fast bmm there)."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.adapters.kernels import lora_kernels
from adapterserve.server.adapters.slots import linear_slot_dtype


def _inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5, 96, 8, generator=gen, dtype=torch.float64) / 96**0.5  # [slots, in, r]
    b = torch.randn(5, 8, 80, generator=gen, dtype=torch.float64)  # [slots, r, out]
    a[0], b[0] = 0, 0  # slot 0: no adapter
    x = torch.randn(6, 3, 96, generator=gen, dtype=torch.float64)  # [B, S, in]
    slots = torch.tensor([0, 3, 1, 3, 4, 2])
    return x.to(dtype), a.to(dtype), b.to(dtype), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gathered_rows_equal_each_rows_own_product(dtype):
    x, a, b, slots = _inputs(dtype)
    kernels = lora_kernels("torch", "cpu")
    h = kernels.shrink(x, a, slots)
    y = kernels.expand(h, b, slots)
    assert h.dtype == dtype and y.dtype == dtype
    assert h.shape == (6, 3, 8) and y.shape == (6, 3, 80)
    for row, slot in enumerate(slots.tolist()):  # each row on its own, in fp64, rounded once to dtype
        want_h = (x[row].double() @ a[slot].double()).to(dtype)
        want_y = (h[row].double() @ b[slot].double()).to(dtype)
        # accumulated in fp32, rounded once: within one step of the dtype of the exact product
        torch.testing.assert_close(h[row], want_h, rtol=torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(y[row], want_y, rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert not h[0].any() and not y[0].any()  # slot 0 is exactly zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_read_their_slots_in_place_and_equal_the_gathered_bmm(dtype):
    """One token per row on a CPU: the embedding-bag path, equal to the gather + bmm it replaces, also
    when the same slots tensor is passed again (cached bag indices) and when a new one is."""
    x, a, b, slots = _inputs(dtype)
    x = x[:, :1]  # [B, 1, in]
    kernels = lora_kernels("torch", "cpu")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for rows in (slots, slots, slots.flip(0)):
        h = kernels.shrink(x, a, rows)
        y = kernels.expand(h, b, rows)
        assert h.shape == (6, 1, 8) and y.shape == (6, 1, 80) and y.dtype == dtype
        torch.testing.assert_close(h, torch.bmm(x, a.index_select(0, rows)), **tol)
        torch.testing.assert_close(y, torch.bmm(h, b.index_select(0, rows)), **tol)
        assert not y[rows == 0].any()  # slot 0 is exactly zero


def test_single_slot_is_the_plain_matmul():
    x, a, _, slots = _inputs(torch.bfloat16)
    kernels = lora_kernels("torch", "cpu")
    same = torch.full_like(slots, 3)
    torch.testing.assert_close(
        kernels.shrink(x, a, same, 3), kernels.shrink(x, a, same), rtol=1e-2, atol=1e-2
    )
    assert torch.equal(kernels.shrink(x, a, same, 3), x @ a[3])


@pytest.mark.parametrize(
    "dtype,device,want",
    [
        (torch.bfloat16, "cpu", torch.float32),
        (torch.float16, "cpu", torch.float32),
        (torch.float32, "cpu", torch.float32),
        (torch.bfloat16, "cuda", torch.bfloat16),  # the half-precision kernels are the fast ones there
    ],
)
def test_linear_slots_dtype(dtype, device, want):
    assert linear_slot_dtype(dtype, torch.device(device)) == want
