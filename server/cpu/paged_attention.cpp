// Decode attention over a paged KV cache, read in place (float32, one thread): see paged_attention.py for
// why and how, and for where it is built (torch's cpp_extension on the first start, cached per machine).
// Checked by tests/server/cpu/test_paged_attention.py: compiled with -Wall -Wextra -Werror, and its output
// against the torch path (gather + SDPA).
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
