"""The Triton kernels of the `triton` backend (imported only where triton is installed).

BGMV style (batched gather matrix-vector, as in punica): both halves of the low-rank product are one
kernel, out[t] = x[t] @ w[slot(t)] with w [num_slots, K, N] (shrink: w = A, K = in, N = r; expand: w = B,
K = r, N = out). One program per (token, block of N) reads its row's slot index from `slots` and
multiplies by that slot's tiles read straight from the slot tensor, so no per-row copy of A / B is ever
made. Tiles are padded to a power of two with masks, and the products are elementwise multiplies reduced
with `tl.sum` (no `tl.dot`, which needs tiles of 16 or more in each dimension), accumulated in fp32.

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


def _bgmv_kernel(
    x_ptr,  # [B, S, K]
    w_ptr,  # [num_slots, K, N]
    slots_ptr,  # [B] long
    out_ptr,  # [B, S, N]
    seq_len,
    k_dim,
    n_dim,
    stride_xb,
    stride_xs,
    stride_xk,
    stride_ws,
    stride_wk,
    stride_wn,
    stride_ob,
    stride_os,
    stride_on,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[b, s, n-block] = x[b, s, :] @ w[slots[b], :, n-block], accumulated in fp32."""
    token = tl.program_id(0)
    block_n = tl.program_id(1)
    row = (token // seq_len).to(tl.int64)
    pos = (token % seq_len).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_dim
    x_row = x_ptr + row * stride_xb + pos * stride_xs
    w_slot = w_ptr + slot * stride_ws
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_dim
        xv = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        wv = tl.load(
            w_slot + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xv[:, None] * wv, axis=0)
    out = out_ptr + row * stride_ob + pos * stride_os + offs_n * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@functools.cache
def jitted(interpret: bool) -> Any:
    """The kernel decorated for the mode `interpret` (the caller passes the current one, so a change of
    TRITON_INTERPRET between launches gets a kernel built for it)."""
    del interpret  # part of the cache key only: triton.jit reads the environment itself
    return triton.jit(_bgmv_kernel)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)
