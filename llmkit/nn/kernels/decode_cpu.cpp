// Two ops of a decoder's one-token step on the CPU (llmkit/nn/decode_kernels.py), each one call where the eager
// PyTorch step issues ten to twenty small ops:
//
//   rms_norm(x, weight, eps, offset)    y = x / sqrt(mean(x^2) + eps) * (offset + weight), x (rows, C) float32;
//                                       the squares summed in double, as ggml's rms_norm sums them
//   decode_attention(q, k_new, v_new, k_cache, v_cache, slot, valid, window, scale)
//                                       writes the new token's keys/values into cache slot `slot` (in the cache's
//                                       dtype: float32, bfloat16 or float16) and returns its attention output
//                                       softmax(scale q K^T) V over the slots it may see, (B, 1, H * D) float32
//
// A query sees slot s <= slot when valid[b, s] (left padding hides keys; the query always sees itself) and, for a
// sliding-window layer (window > 0), slot - s < window. Grouped-query attention: query head h reads key/value head
// h / (H / Hkv), so one pass over a key/value head's slots serves its whole group of query heads.
//
// The slots are split into chunks of kChunk, each (row, key/value head, chunk) one task on torch's threads
// ("flash-decoding", Dao et al. 2023): a task keeps its chunk's softmax statistics, the running maximum m and sum
// l = sum_s exp(score_s - m), with acc = sum_s exp(score_s - m) v_s; the chunks then combine exactly,
//
//   out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c,   M = max_c m_c,
//
// so a short context still spreads over every thread. Scores and sums are float32.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMKIT_SIMD 1
#endif

#ifndef LLMKIT_OPS
#define LLMKIT_OPS llmkit_nn
#endif
#define LLMKIT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // (an indirection, so LLMKIT_OPS is expanded first)
#define LLMKIT_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

namespace {

constexpr int64_t kChunk = 64;  // key slots per task

// ---- rms_norm ----

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 x and weight");
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.numel() == C, "rms_norm: weight has ", weight.numel(), " values for rows of ", C);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t rows = C ? xc.numel() / C : 0;
  const float add = static_cast<float>(offset);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = px + r * C;
      double sum = 0.0;
      int64_t c = 0;
#ifdef LLMKIT_SIMD
      __m256d acc = _mm256_setzero_pd();
      for (; c + 8 <= C; c += 8) {  // float squares, summed in double
        const __m256 v = _mm256_loadu_ps(row + c);
        const __m256 sq = _mm256_mul_ps(v, v);
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
      }
      double lanes[4];
      _mm256_storeu_pd(lanes, acc);
      sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
      for (; c < C; ++c) sum += static_cast<double>(row[c] * row[c]);
      const float scale = 1.0f / std::sqrt(static_cast<float>(sum / C) + static_cast<float>(eps));
      float* out = py + r * C;
      for (c = 0; c < C; ++c) out[c] = (row[c] * scale) * (add + pw[c]);
    }
  });
  return y;
}

// ---- decode_attention ----

template <typename T>
inline float widen(T v) { return static_cast<float>(v); }

#ifdef LLMKIT_SIMD
template <typename T>
inline __m256 load8(const T* p);
template <>
inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {  // bfloat16 = the high half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
#ifdef LLMKIT_SIMD
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  sum = hsum(acc);
#endif
  for (; d < D; ++d) sum += q[d] * widen(k[d]);
  return sum;
}

template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t D) {  // acc += p v
  int64_t d = 0;
#ifdef LLMKIT_SIMD
  const __m256 pv = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < D; ++d) acc[d] += p * widen(v[d]);
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
            at::Tensor& v_cache, int64_t slot, const bool* valid, int64_t valid_stride, int64_t window, float scale,
            at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = H / Hkv;
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const float* pq = q.data_ptr<float>();
  // the new token's keys and values into their slot, rounded to the cache's dtype as a tensor copy rounds them
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* kn = k_new.data_ptr<float>() + b * k_new.stride(0) + h * k_new.stride(1);
      const float* vn = v_new.data_ptr<float>() + b * v_new.stride(0) + h * v_new.stride(1);
      T* kd = kc + ((b * Hkv + h) * S + slot) * D;
      T* vd = vc + ((b * Hkv + h) * S + slot) * D;
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = static_cast<T>(kn[d * k_new.stride(3)]);
        vd[d] = static_cast<T>(vn[d * v_new.stride(3)]);
      }
    }
  const int64_t first = window > 0 ? std::max<int64_t>(0, slot - window + 1) : 0;
  const int64_t n_chunks = (slot + 1 - first + kChunk - 1) / kChunk;
  const int64_t stats = D + 2;  // per chunk and query head: m, l, acc (D)
  std::vector<float> partial(B * Hkv * n_chunks * G * stats);
  constexpr float kMinus = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * kChunk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task % n_chunks, bh = task / n_chunks, b = bh / Hkv, g = bh % Hkv;
      const int64_t s0 = first + c * kChunk, s1 = std::min(s0 + kChunk, slot + 1);
      const T* keys = kc + (b * Hkv + g) * S * D;
      const T* values = vc + (b * Hkv + g) * S * D;
      const float* queries = pq + b * q.stride(0) + g * G * q.stride(1);
      for (int64_t s = s0; s < s1; ++s) {
        const bool seen = s == slot || valid == nullptr || valid[b * valid_stride + s];
        for (int64_t h = 0; h < G; ++h)
          scores[h * kChunk + s - s0] = seen ? scale * dot(queries + h * q.stride(1), keys + s * D, D) : kMinus;
      }
      for (int64_t h = 0; h < G; ++h) {
        float* stat = partial.data() + (task * G + h) * stats;  // m, l, acc
        float* row = scores.data() + h * kChunk;
        float m = kMinus;
        for (int64_t s = 0; s < s1 - s0; ++s) m = std::max(m, row[s]);
        float l = 0.f;
        std::fill(stat + 2, stat + stats, 0.f);
        if (m != kMinus) {
          for (int64_t s = 0; s < s1 - s0; ++s) {
            if (row[s] == kMinus) continue;
            const float p = std::exp(row[s] - m);
            l += p;
            axpy(stat + 2, p, values + (s0 + s) * D, D);
          }
        }
        stat[0] = m;
        stat[1] = l;
      }
    }
  });
  float* po = out.data_ptr<float>();  // (B, 1, H * D)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / G, within = h % G;
      const float* base = partial.data() + ((b * Hkv + g) * n_chunks * G + within) * stats;  // chunk 0
      float M = kMinus;
      for (int64_t c = 0; c < n_chunks; ++c) M = std::max(M, base[c * G * stats]);
      float* o = po + (b * H + h) * D;
      std::fill(o, o + D, 0.f);
      float l = 0.f;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* stat = base + c * G * stats;
        if (stat[0] == kMinus) continue;
        const float w = std::exp(stat[0] - M);
        l += w * stat[1];
        for (int64_t d = 0; d < D; ++d) o[d] += w * stat[2 + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= l;  // l >= 1: the query's own slot is always seen
    }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t slot, const c10::optional<at::Tensor>& valid, int64_t window,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat && q.stride(3) == 1,
              "decode_attention: q must be float32 (B, H, 1, D) with unit stride along D");
  TORCH_CHECK(k_new.scalar_type() == at::kFloat && v_new.scalar_type() == at::kFloat && k_new.dim() == 4 &&
                  v_new.dim() == 4 && k_new.size(2) == 1 && v_new.size(2) == 1,
              "decode_attention: k_new, v_new must be float32 (B, Hkv, 1, D)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.dim() == 4,
              "decode_attention: contiguous key and value caches (B, Hkv, S, D) of one dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && H % Hkv == 0 && k_new.size(1) == Hkv &&
                  k_new.size(0) == B && k_new.size(3) == D && v_new.sizes() == k_new.sizes(),
              "decode_attention: q, the new keys/values and the caches disagree in shape");
  TORCH_CHECK(slot >= 0 && slot < k_cache.size(2), "decode_attention: slot ", slot, " outside the cache");
  const bool* pv = nullptr;
  int64_t valid_stride = 0;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 2 && valid->size(0) == B &&
                    valid->size(1) > slot && valid->stride(1) == 1,
                "decode_attention: valid must be bool (B, >slot) with unit stride");
    pv = valid->data_ptr<bool>();
    valid_stride = valid->stride(0);
  }
  at::Tensor out = at::empty({B, 1, H * D}, q.options());
  const float s = static_cast<float>(scale);
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend<float>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, out); break;
    case at::kBFloat16:
      attend<c10::BFloat16>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, out);
      break;
    case at::kHalf: attend<c10::Half>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, out); break;
    default: TORCH_CHECK(false, "decode_attention: a float32, bfloat16 or float16 cache");
  }
  return out;
}

}  // namespace

LLMKIT_LIBRARY(LLMKIT_OPS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, int slot, "
        "Tensor? valid, int window, float scale) -> Tensor");
}

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
}
