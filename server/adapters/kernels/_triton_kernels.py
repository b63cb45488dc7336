"""The Triton kernels of the `triton` backend (imported only where triton is installed).

BGMV style (batched gather matrix-vector, as in punica): one program per token (and per block of output
columns for expand) reads its row's slot index from `slots` and multiplies by that slot's A / B tiles
read straight from the slot tensors, so no per-row copy of A / B is ever made. Rank tiles are padded to a
power of two with masks, and the products are elementwise multiplies reduced with `tl.sum` (no `tl.dot`,
which needs tiles of 16 or more in each dimension), accumulated in fp32.

Only long-stable `tl` calls are used (load, store, arange, program_id, zeros, sum, constexpr), so the
kernels build on the Triton that ships with the CUDA torch as well as on the one CI installs.

The functions are decorated lazily (`jitted()`): `triton.jit` decides at decoration time whether a
kernel runs compiled or in the CPU interpreter (TRITON_INTERPRET=1), so the choice follows the
environment at the first launch rather than at import.
"""

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl


def _shrink_kernel(
    x_ptr,  # [B, S, in]
    a_ptr,  # [num_slots, in, r]
    slots_ptr,  # [B] long
    out_ptr,  # [B, S, r]
    seq_len,
    in_dim,
    rank,
    stride_xb,
    stride_xs,
    stride_xk,
    stride_as,
    stride_ak,
    stride_ar,
    stride_ob,
    stride_os,
    stride_or,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    row = (token // seq_len).to(tl.int64)
    pos = (token % seq_len).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    x_row = x_ptr + row * stride_xb + pos * stride_xs
    a_slot = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_dim
        xv = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        av = tl.load(
            a_slot + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xv[:, None] * av, axis=0)
    out = out_ptr + row * stride_ob + pos * stride_os + offs_r * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_r)


def _expand_kernel(
    h_ptr,  # [B, S, r]
    b_ptr,  # [num_slots, r, out]
    slots_ptr,  # [B] long
    out_ptr,  # [B, S, out]
    seq_len,
    rank,
    out_dim,
    stride_hb,
    stride_hs,
    stride_hr,
    stride_bs,
    stride_br,
    stride_bn,
    stride_ob,
    stride_os,
    stride_on,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    block_n = tl.program_id(1)
    row = (token // seq_len).to(tl.int64)
    pos = (token % seq_len).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_dim
    h_row = h_ptr + row * stride_hb + pos * stride_hs
    b_slot = b_ptr + slot * stride_bs
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        hv = tl.load(h_row + offs_r * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
        bv = tl.load(
            b_slot + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(hv[:, None] * bv, axis=0)
    out = out_ptr + row * stride_ob + pos * stride_os + offs_n * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@functools.cache
def jitted(interpret: bool) -> tuple[Any, Any]:
    """(shrink, expand) decorated for the mode `interpret` (the caller passes the current one, so a
    change of TRITON_INTERPRET between launches gets kernels built for it)."""
    del interpret  # part of the cache key only: triton.jit reads the environment itself
    return triton.jit(_shrink_kernel), triton.jit(_expand_kernel)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)
