"""Decode attention that reads a paged KV cache's blocks in place, for the engine on a CPU.

Why: the portable paged read (paged_kv_cache.PagedKVCache.read_blocks, then SDPA) copies every row's
blocks into a dense [B, kvH, L, D] tensor in every layer and step, and SDPA reads that copy again: the
keys and values cross memory three times. On a CPU a decode step is bound by memory (the weights at
few rows, the cache at many), and torch has no op that attends over a block table. Measured on the
2-core development VM (AMD EPYC, AVX2), SmolLM2's 30 layers, 16 decoding rows at ~200 cached
positions, one thread: the gather (`index_select`) and SDPA were 17.5 ms of a 67 ms decode step (26%);
see docs/performance.md for this kernel's figures against that path.

How: a small C++ kernel, paged_attention.cpp beside this file (shipped in the wheel as package data),
built on the first start on a machine with torch's cpp_extension and cached under torch's extensions
folder (a new source, flags, CPU or torch version builds anew). For each row it walks the row's block
table in order, scores every query head against each key where it lies (a position's [kvH, D] keys are
contiguous, so a block is read once for all heads), takes the softmax, and sums the values the same way:
each key and value is read once. The hardware prefetcher cannot follow a block table, so the key `AHEAD`
positions on is prefetched; without that the loads stalled and the kernel ran 1.5x slower than gather +
SDPA. One thread (built without OpenMP, so no second OpenMP runtime is linked into the process). Float32
only (the CPU engine's dtype); masks as the torch path builds them for a decode row: keys 0..position,
and within `window` of it where the layer has one. Logit soft-capping (Gemma-2) and other dtypes stay on
the torch path. The source is compiled with -Wall -Wextra -Werror by the tests.

`EngineSettings.cpu.paged_attention` chooses: `auto` (the default) takes the kernel where it applies (a
CPU engine, float32, the paged cache) and can be built (a C++ compiler and Python's headers; the first
build takes ~25 s on 2 cores and is logged), else the torch path, with the reason logged; `kernel`
refuses to start without it; `torch` always gathers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import CpuPagedAttention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")  # shipped as package data (pyproject.toml)
FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]


def _build_name() -> str:
    """The extension's name: a hash of the source, the flags and this machine's CPU (so a cache folder
    shared by machines of different CPUs never loads code built for another's instruction set)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    source = SOURCE.read_text()
    digest = hashlib.sha256("\0".join([source, *FLAGS, cpu, torch.__version__]).encode()).hexdigest()
    return f"adapterserve_paged_attention_{digest[:16]}"


@functools.cache
def _module():
    """The built extension, or None where it cannot be built (logged once)."""
    try:
        from torch.utils.cpp_extension import load
    except ImportError as e:  # torch without its build helpers
        log.warning("CPU paged attention kernel unavailable (%s): decode attention gathers pages", e)
        return None
    started = time.monotonic()
    log.info(
        "loading the CPU paged attention kernel (built on the first start on a machine, ~25 s; then cached)"
    )
    try:
        module = load(name=_build_name(), sources=[str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as e:  # no compiler, no Python headers, a build error: the torch path serves
        log.warning("CPU paged attention kernel could not be built (%s): decode attention gathers pages", e)
        return None
    log.info("CPU paged attention kernel ready (%.1f s)", time.monotonic() - started)
    return module


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _module() is not None


def use_kernel(setting: CpuPagedAttention, device: torch.device, dtype: torch.dtype, paged: bool) -> bool:
    """Whether an engine's decode attention takes the kernel (builds it when it may). `kernel` where it
    does not apply or cannot be built raises InvalidArgumentError."""
    if setting == "torch":
        return False
    reason = None
    if device.type != "cpu":
        reason = f"the engine runs on {device.type}"
    elif dtype != torch.float32:
        reason = f"the engine's dtype is {dtype} (the kernel is float32)"
    elif not paged:
        reason = "the KV cache is dense"
    elif not available():
        reason = "it could not be built here (see the warning above)"
    if reason is None:
        log.info("decode attention reads the paged KV cache in place (cpu.paged_attention: %s)", setting)
        return True
    if setting == "kernel":
        raise InvalidArgumentError(
            f"cpu.paged_attention='kernel' (--cpu-paged-attention kernel) but {reason}"
        )
    if device.type == "cpu":
        log.info("decode attention gathers the KV pages (torch path): %s", reason)
    return False


def _run(
    query: torch.Tensor,  # [B, H, D] contiguous
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,  # [B]
    window: int,
    scale: float,
) -> torch.Tensor:
    module = _module()
    assert module is not None, "paged_decode_attention called where use_kernel() is False"
    return module.paged_decode_attention(query, k_pool, v_pool, table, positions, window, scale)


# Under torch.compile (compile_decode) the kernel is an opaque custom op; eager calls skip its dispatch.
@torch.library.custom_op("adapterserve::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    return _run(query, k_pool, v_pool, table, positions, window, scale)


@_paged_decode_attention_op.register_fake
def _(query, k_pool, v_pool, table, positions, window, scale) -> torch.Tensor:
    return query.new_empty(query.shape)


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, 1, D]
    k_pool: torch.Tensor,  # [N, bs, kvH, D] one layer's pool
    v_pool: torch.Tensor,  # [N, bs, kvH, D]
    table: torch.Tensor,  # [B, >= blocks] the rows' block tables
    positions: torch.Tensor,  # [B, 1] each row's cache position
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Each row's query over its cached keys 0..position (within `window` where set). Returns
    [B, H, 1, D], as SDPA over the gathered pages does."""
    b, h, _, d = query.shape
    args = (
        query.reshape(b, h, d).contiguous(),
        k_pool,
        v_pool,
        table,
        positions.reshape(b),
        window or 0,
        scale,
    )
    run = _paged_decode_attention_op if torch.compiler.is_compiling() else _run
    return run(*args).unsqueeze(2)  # [B, H, 1, D]
