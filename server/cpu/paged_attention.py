"""Decode attention that reads a paged KV cache's blocks in place, for the engine on a CPU.

Why: the portable paged read (paged_kv_cache.PagedKVCache.read_blocks, then SDPA) copies every row's
blocks into a dense [B, kvH, L, D] tensor in every layer and step, and SDPA reads that copy again: the
keys and values cross memory three times. On a CPU a decode step is bound by memory (the weights at
few rows, the cache at many), and torch has no op that attends over a block table. Measured on the
2-core development VM (AMD EPYC, AVX2), SmolLM2's 30 layers, 16 decoding rows at ~200 cached
positions, one thread: the gather (`index_select`) and SDPA were 17.5 ms of a 67 ms decode step (26%);
see docs/performance.md for this kernel's figures against that path.

How: a small C++ kernel (built once per machine with torch's cpp_extension, cached under torch's
extensions folder): for each row it walks the row's block table in order, scores every query head
against each key where it lies (a position's [kvH, D] keys are contiguous, so a block is read once for
all heads), takes the softmax, and sums the values the same way: each key and value is read once. The
hardware prefetcher cannot follow a block table, so the key `AHEAD` positions on is prefetched; without
that the loads stalled and the kernel ran 1.5x slower than gather + SDPA. One thread (built without
OpenMP, so no second OpenMP runtime is linked into the process). Float32 only (the CPU engine's dtype); masks as the torch path builds
them for a decode row: keys 0..position, and within `window` of it where the layer has one. Logit
soft-capping (Gemma-2) and other dtypes stay on the torch path.

`EngineSettings.cpu_paged_attention` chooses: `auto` (the default) takes the kernel where it applies (a
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

import torch

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import CpuPagedAttention

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <vector>

typedef float v8 __attribute__((vector_size(32)));  // 8 floats: AVX2's width, split by the compiler elsewhere

static inline v8 load8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// exp(x) for x <= 0 (scores minus their maximum), 8 at a time: 2^k * e^r with r in [-ln2/2, ln2/2], a
// degree-6 polynomial for e^r (relative error < 2e-7, float32's own rounding), underflow to 0 below -87.
static inline v8 exp8(v8 x) {
  const v8 lo = v8{} - 87.f;
  x = x < lo ? lo : x;
  const v8 k = __builtin_convertvector(
      __builtin_convertvector(x * 1.44269504088896341f + (x < 0 ? v8{} - 0.5f : v8{} + 0.5f), __attribute__((vector_size(32))) int),
      v8);
  const v8 r = x - k * 0.693359375f + k * 2.12194440e-4f;
  v8 p = v8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  typedef int i8 __attribute__((vector_size(32)));
  const i8 bits = (__builtin_convertvector(k, i8) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8 y = p * scale;
  return x <= lo ? v8{} : y;
}

// The loads of a key or value `AHEAD` positions on are started early: a row's blocks lie anywhere in
// the pool, and the hardware prefetcher does not follow a block table.
constexpr int64_t AHEAD = 8;

static inline void prefetch_key(const float* pool, const int64_t* table, int64_t key, int64_t bs,
                                int64_t blocks, int64_t slab) {
  const int64_t block = table[key / bs];
  if (block < 0 || block >= blocks) return;
  const char* p = reinterpret_cast<const char*>(pool + (block * bs + key % bs) * slab);
  for (int64_t off = 0; off < slab * 4; off += 64) __builtin_prefetch(p + off);
}

static inline float hsum8(v8 x) {  // the sum of 8 lanes, as a tree
  typedef float v4 __attribute__((vector_size(16)));
  v4 lo, hi;
  std::memcpy(&lo, &x, 16);
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 16, 16);
  const v4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// softmax over s[0..n) in place
static inline void softmax_inplace(float* s, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
  float total = 0.f;
  int64_t j = 0;
  v8 sum{};
  for (; j + 8 <= n; j += 8) {
    const v8 e = exp8(load8(s + j) - top);
    std::memcpy(s + j, &e, sizeof(e));
    sum += e;
  }
  for (int l = 0; l < 8; ++l) total += sum[l];
  for (; j < n; ++j) { s[j] = std::exp(s[j] - top); total += s[j]; }
  const float inv = 1.f / total;
  for (j = 0; j < n; ++j) s[j] *= inv;
}

// out[b, h, :] = softmax(scale * q[b, h] . k[j]) @ v[j] over the keys j of row b (positions lo..pos),
// each key found through the row's block table: block table[b, j / bs], offset j % bs.
torch::Tensor paged_decode_attention(
    torch::Tensor q,          // [B, H, D] float32, contiguous
    torch::Tensor k_pool,     // [N, bs, kvH, D] float32, contiguous (one layer's pool)
    torch::Tensor v_pool,     // [N, bs, kvH, D]
    torch::Tensor table,      // [B, >= blocks] int64
    torch::Tensor positions,  // [B] int64: each row's position (the last key it sees)
    int64_t window,           // > 0: keys within `window` of the position only
    double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat
              && v_pool.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous only");
  TORCH_CHECK(table.scalar_type() == at::kLong && positions.scalar_type() == at::kLong, "int64 indices");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t N = k_pool.size(0), bs = k_pool.size(1), kvH = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && H % kvH == 0, "heads or head size do not match");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == B && positions.numel() == B, "one table row per row");
  const int64_t g = H / kvH;
  auto table_c = table.contiguous();
  auto pos_c = positions.contiguous();
  const int64_t width = table_c.size(1);
  const int64_t* tab = table_c.data_ptr<int64_t>();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < width * bs, "position outside the row's block table");
  }
  auto out = torch::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  bool bad_block = false;

  // One row per task: its keys block by block ([bs, kvH, D] contiguous), every head at once, so each
  // block is read once, in order, for the scores and once for the values.
  const int64_t lanes = D / 8;
  const int64_t slab = kvH * D;  // floats per position
  const bool vec = D % 8 == 0;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [H, n]
    std::vector<v8> acc(vec ? H * lanes : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t last = pos[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      scores.resize(H * n);
      const float* qb = qp + b * H * D;
      const int64_t* tb = tab + b * width;
      for (int64_t key = first; key <= last; ++key) {
        const int64_t block = tb[key / bs];
        if (block < 0 || block >= N) { bad_block = true; return; }
        const float* kj = kp + (block * bs + key % bs) * kvH * D;  // [kvH, D]
        const int64_t j = key - first;
        if (key + AHEAD <= last) prefetch_key(kp, tb, key + AHEAD, bs, N, slab);
        for (int64_t qh = 0; qh < H; ++qh) {
          const float* qi = qb + qh * D;
          const float* kh = kj + (qh / g) * D;
          float dot = 0.f;
          if (vec) {
            v8 sum = load8(qi) * load8(kh);
            for (int64_t l = 1; l < lanes; ++l) sum += load8(qi + 8 * l) * load8(kh + 8 * l);
            dot = hsum8(sum);
          } else {
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * kh[d];
          }
          scores[qh * n + j] = dot * sc;
        }
      }
      for (int64_t qh = 0; qh < H; ++qh) softmax_inplace(scores.data() + qh * n, n);
      float* ob = op + b * H * D;
      if (vec) {
        std::fill(acc.begin(), acc.end(), v8{});
        for (int64_t key = first; key <= last; ++key) {
          const float* vj = vp + (tb[key / bs] * bs + key % bs) * kvH * D;  // [kvH, D]
          const int64_t j = key - first;
          if (key + AHEAD <= last) prefetch_key(vp, tb, key + AHEAD, bs, N, slab);
          for (int64_t qh = 0; qh < H; ++qh) {
            const float w = scores[qh * n + j];
            const float* vh = vj + (qh / g) * D;
            v8* a = acc.data() + qh * lanes;
            for (int64_t l = 0; l < lanes; ++l) a[l] += w * load8(vh + 8 * l);
          }
        }
        std::memcpy(ob, acc.data(), H * D * sizeof(float));
      } else {
        std::fill(ob, ob + H * D, 0.f);
        for (int64_t key = first; key <= last; ++key) {
          const float* vj = vp + (tb[key / bs] * bs + key % bs) * kvH * D;
          for (int64_t qh = 0; qh < H; ++qh)
            for (int64_t d = 0; d < D; ++d) ob[qh * D + d] += scores[qh * n + key - first] * vj[(qh / g) * D + d];
        }
      }
    }
  });
  TORCH_CHECK(!bad_block, "a block table entry is outside the KV pool");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]


def _build_name() -> str:
    """The extension's name: a hash of the source, the flags and this machine's CPU (so a cache folder
    shared by machines of different CPUs never loads code built for another's instruction set)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cpu, torch.__version__]).encode()).hexdigest()
    return f"adapterserve_paged_attention_{digest[:16]}"


@functools.cache
def _module():
    """The built extension, or None where it cannot be built (logged once)."""
    try:
        from torch.utils.cpp_extension import load_inline
    except ImportError as e:  # torch without its build helpers
        log.warning("CPU paged attention kernel unavailable (%s): decode attention gathers pages", e)
        return None
    started = time.monotonic()
    log.info(
        "loading the CPU paged attention kernel (built on the first start on a machine, ~25 s; then cached)"
    )
    try:
        module = load_inline(
            name=_build_name(),
            cpp_sources=[_SOURCE],
            extra_cflags=_FLAGS,
            verbose=False,
        )
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
        log.info("decode attention reads the paged KV cache in place (cpu_paged_attention: %s)", setting)
        return True
    if setting == "kernel":
        raise InvalidArgumentError(f"cpu_paged_attention='kernel' but {reason}")
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
