// Three ops of a decoder's one-token step on the CPU (llmkit/nn/decode_kernels.py), each one call where the eager
// PyTorch step issues several small ops (ten to twenty for the norm and the attention):
//
//   rms_norm(x, weight, eps, offset)    y = x / sqrt(mean(x^2) + eps) * (offset + weight), x (rows, C) float32;
//                                       the squares summed in double, as ggml's rms_norm sums them
//   decode_attention(q, k_new, v_new, k_cache, v_cache, slot, valid, window, scale, cos, sin)
//                                       rotates q and the new keys by RoPE when cos/sin are given, writes the new
//                                       token's keys/values into cache slot `slot` (in the cache's dtype: float32,
//                                       bfloat16 or float16) and returns its attention output
//                                       softmax(scale q K^T) V over the slots it may see, (B, 1, H * D) float32
//   linear(x, weight_t, bias)           y = x W^T + b for a few rows of x (a decode step: one per sequence), from
//                                       the weight's transpose W^T (in, out), float32, float16 or bfloat16
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
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "llmkit_ops.h"  // llmkit/kernels: the op namespace, as_rows, rows_shape

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMKIT_SIMD 1
#endif


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

#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef LLMKIT_SIMD
// e^x for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial (relative error ~1e-7), times
// 2^n through the exponent bits; x below -87.3 (a masked score minus the maximum) gives 0
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 below = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
#endif

constexpr int64_t kMaxGroup = 8;  // query heads handled together against one key/value row

// scores[h][s - s0] = scale q_h . k_s for the G (<= kMaxGroup) query heads at `queries` (stride qs), slots s0..s1.
// Up to three heads at once against four key rows at a time: each key vector is loaded (and widened from bfloat16 or
// float16) once for the heads, 12 independent FMA chains, one horizontal reduction per head for its four sums.
template <typename T, int kHeads>
void scores_of_heads(const float* queries, int64_t qs, const T* keys, int64_t s0, int64_t s1, int64_t D, float scale,
                     float* scores) {
  int64_t s = s0;
#ifdef LLMKIT_SIMD
  if (D % 8 == 0) {
    for (; s + 4 <= s1; s += 4) {
      const T* k = keys + s * D;
      __m256 a[kHeads][4];
      for (int h = 0; h < kHeads; ++h)
        for (int j = 0; j < 4; ++j) a[h][j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 k0 = load8(k + d), k1 = load8(k + D + d), k2 = load8(k + 2 * D + d), k3 = load8(k + 3 * D + d);
        for (int h = 0; h < kHeads; ++h) {
          const __m256 qv = _mm256_loadu_ps(queries + h * qs + d);
          a[h][0] = _mm256_fmadd_ps(qv, k0, a[h][0]);
          a[h][1] = _mm256_fmadd_ps(qv, k1, a[h][1]);
          a[h][2] = _mm256_fmadd_ps(qv, k2, a[h][2]);
          a[h][3] = _mm256_fmadd_ps(qv, k3, a[h][3]);
        }
      }
      for (int h = 0; h < kHeads; ++h) {
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
        const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));  // keys 0-3
        _mm_storeu_ps(scores + h * kChunk + s - s0, _mm_mul_ps(sums, _mm_set1_ps(scale)));
      }
    }
  }
#endif
  for (; s < s1; ++s) {
    const T* k = keys + s * D;
    for (int h = 0; h < kHeads; ++h) {
      const float* qh = queries + h * qs;
      float sum = 0.f;
      for (int64_t d = 0; d < D; ++d) sum += qh[d] * widen(k[d]);
      scores[h * kChunk + s - s0] = scale * sum;
    }
  }
}

template <typename T>
void group_scores(const float* queries, int64_t qs, int64_t G, const T* keys, int64_t s0, int64_t s1, int64_t D,
                  float scale, float* scores) {
  for (int64_t h = 0; h < G;) {
    const float* qh = queries + h * qs;
    float* out = scores + h * kChunk;
    if (G - h >= 3) scores_of_heads<T, 3>(qh, qs, keys, s0, s1, D, scale, out), h += 3;
    else if (G - h == 2) scores_of_heads<T, 2>(qh, qs, keys, s0, s1, D, scale, out), h += 2;
    else scores_of_heads<T, 1>(qh, qs, keys, s0, s1, D, scale, out), h += 1;
  }
}

// p = exp(row - m) in place over n scores (0 where a score is -inf); returns their sum
inline float exponentiate(float* row, int64_t n, float m) {
  int64_t s = 0;
  float l = 0.f;
#ifdef LLMKIT_SIMD
  __m256 sum = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (; s + 8 <= n; s += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), mv));
    _mm256_storeu_ps(row + s, p);
    sum = _mm256_add_ps(sum, p);
  }
  l = hsum(sum);
#endif
  for (; s < n; ++s) {
    row[s] = std::exp(row[s] - m);  // exp(-inf) = 0
    l += row[s];
  }
  return l;
}

// acc[h] += sum_s p[h][s] v_s over slots s0..s1 for up to three heads (p rows kChunk apart, acc rows `stride` floats
// apart): 32 output values at a time, each value vector loaded (and widened) once per slot for the heads, one
// broadcast of p per head and 4 independent FMAs
template <typename T, int kHeads>
void values_of_heads(const float* p, const T* values, int64_t s0, int64_t s1, int64_t D, float* acc, int64_t stride) {
  int64_t d0 = 0;
#if defined(LLMKIT_SIMD) && defined(__AVX512F__)  // load16 lives with load8
  // AVX-512: 64 values at a time, so a head of 64 (SmolLM2's, Llama's) reads each value row in one pass instead of
  // two strided ones (SmolLM2's attention at 300-1,500 cached slots 10-30% faster on the Zen 4 VM); each value's sum
  // still runs over the slots in order
  for (; d0 + 64 <= D; d0 += 64) {
    __m512 r[kHeads][4];
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < 4; ++j) r[h][j] = _mm512_loadu_ps(acc + h * stride + d0 + 16 * j);
    for (int64_t s = s0; s < s1; ++s) {
      const T* v = values + s * D + d0;
      const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
      for (int h = 0; h < kHeads; ++h) {
        const __m512 pv = _mm512_set1_ps(p[h * kChunk + s - s0]);
        r[h][0] = _mm512_fmadd_ps(pv, v0, r[h][0]);
        r[h][1] = _mm512_fmadd_ps(pv, v1, r[h][1]);
        r[h][2] = _mm512_fmadd_ps(pv, v2, r[h][2]);
        r[h][3] = _mm512_fmadd_ps(pv, v3, r[h][3]);
      }
    }
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + h * stride + d0 + 16 * j, r[h][j]);
  }
#endif
#ifdef LLMKIT_SIMD
  for (; d0 + 32 <= D; d0 += 32) {
    __m256 r[kHeads][4];
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < 4; ++j) r[h][j] = _mm256_loadu_ps(acc + h * stride + d0 + 8 * j);
    for (int64_t s = s0; s < s1; ++s) {
      const T* v = values + s * D + d0;
      const __m256 v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
      for (int h = 0; h < kHeads; ++h) {
        const __m256 pv = _mm256_set1_ps(p[h * kChunk + s - s0]);
        r[h][0] = _mm256_fmadd_ps(pv, v0, r[h][0]);
        r[h][1] = _mm256_fmadd_ps(pv, v1, r[h][1]);
        r[h][2] = _mm256_fmadd_ps(pv, v2, r[h][2]);
        r[h][3] = _mm256_fmadd_ps(pv, v3, r[h][3]);
      }
    }
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(acc + h * stride + d0 + 8 * j, r[h][j]);
  }
#endif
  for (int h = 0; h < kHeads; ++h)
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t d = d0; d < D; ++d) acc[h * stride + d] += p[h * kChunk + s - s0] * widen(values[s * D + d]);
}

template <typename T>
void group_values(const float* p, int64_t G, const T* values, int64_t s0, int64_t s1, int64_t D, float* acc,
                  int64_t stride) {
  for (int64_t h = 0; h < G;) {
    const float* ph = p + h * kChunk;
    float* ah = acc + h * stride;
    if (G - h >= 3) values_of_heads<T, 3>(ph, values, s0, s1, D, ah, stride), h += 3;
    else if (G - h == 2) values_of_heads<T, 2>(ph, values, s0, s1, D, ah, stride), h += 2;
    else values_of_heads<T, 1>(ph, values, s0, s1, D, ah, stride), h += 1;
  }
}

// RoPE of one head's vector x (D values, stride `step`) into y: channel pairs (i, i + R/2) rotated by the position's
// angles ("rotate half": y = x cos + [-x2, x1] sin over the first R channels, as nn/position.py's apply_rope), the
// channels from R on copied (partial rotary); cos/sin hold the R values of the row's position
inline void rotate(const float* x, int64_t step, const float* cos, const float* sin, int64_t R, int64_t D, float* y) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i * step], x2 = x[(i + half) * step];
    y[i] = x1 * cos[i] - x2 * sin[i];
    y[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
  }
  for (int64_t d = R; d < D; ++d) y[d] = x[d * step];
}

// The rotary tables of a decode step: cos, sin float32 (B or 1, 1, 1, R); R = 0 without them
struct Rotary {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t row_stride = 0, R = 0;
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
            at::Tensor& v_cache, int64_t slot, const bool* valid, int64_t valid_stride, int64_t window, float scale,
            const Rotary& rope, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = H / Hkv;
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const float* pq = q.data_ptr<float>();
  int64_t q_row = q.stride(0), q_head = q.stride(1);
  std::vector<float> rotated_q, key(D);
  if (rope.R > 0) {  // the queries rotated once, (B, H, D) contiguous
    rotated_q.resize(B * H * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        rotate(pq + b * q.stride(0) + h * q.stride(1), 1, rope.cos + b * rope.row_stride,
               rope.sin + b * rope.row_stride, rope.R, D, rotated_q.data() + (b * H + h) * D);
    pq = rotated_q.data(), q_row = H * D, q_head = D;
  }
  // the new token's keys (rotated) and values into their slot, rounded to the cache's dtype as a tensor copy
  // rounds them
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* kn = k_new.data_ptr<float>() + b * k_new.stride(0) + h * k_new.stride(1);
      const float* vn = v_new.data_ptr<float>() + b * v_new.stride(0) + h * v_new.stride(1);
      T* kd = kc + ((b * Hkv + h) * S + slot) * D;
      T* vd = vc + ((b * Hkv + h) * S + slot) * D;
      if (rope.R > 0) {
        rotate(kn, k_new.stride(3), rope.cos + b * rope.row_stride, rope.sin + b * rope.row_stride, rope.R, D,
               key.data());
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<T>(key[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<T>(kn[d * k_new.stride(3)]);
      }
      for (int64_t d = 0; d < D; ++d) vd[d] = static_cast<T>(vn[d * v_new.stride(3)]);
    }
  const int64_t first = window > 0 ? std::max<int64_t>(0, slot - window + 1) : 0;
  const int64_t n_chunks = (slot + 1 - first + kChunk - 1) / kChunk;
  const int64_t stats = D + 2;  // per chunk and query head: m, l, acc (D)
  std::vector<float> partial(B * Hkv * n_chunks * G * stats);
  constexpr float kMinus = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(kMaxGroup * kChunk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task % n_chunks, bh = task / n_chunks, b = bh / Hkv, g = bh % Hkv;
      const int64_t s0 = first + c * kChunk, s1 = std::min(s0 + kChunk, slot + 1), n = s1 - s0;
      const T* keys = kc + (b * Hkv + g) * S * D;
      const T* values = vc + (b * Hkv + g) * S * D;
      for (int64_t h0 = 0; h0 < G; h0 += kMaxGroup) {  // query heads h0.. of the group, at most kMaxGroup at once
        const int64_t heads = std::min(kMaxGroup, G - h0);
        const float* queries = pq + b * q_row + (g * G + h0) * q_head;
        group_scores(queries, q_head, heads, keys, s0, s1, D, scale, scores.data());
        if (valid != nullptr)  // left padding: hidden keys (the query's own slot stays seen)
          for (int64_t s = s0; s < s1; ++s)
            if (s != slot && !valid[b * valid_stride + s])
              for (int64_t h = 0; h < heads; ++h) scores[h * kChunk + s - s0] = kMinus;
        float* stat = partial.data() + (task * G + h0) * stats;  // m, l, acc per head
        for (int64_t h = 0; h < heads; ++h) {
          float* row = scores.data() + h * kChunk;
          const float m = *std::max_element(row, row + n);
          std::fill(stat + h * stats + 2, stat + (h + 1) * stats, 0.f);
          stat[h * stats] = m;
          stat[h * stats + 1] = m == kMinus ? 0.f : exponentiate(row, n, m);
          if (m == kMinus) std::fill(row, row + n, 0.f);  // a chunk of padding only: adds nothing
        }
        group_values(scores.data(), heads, values, s0, s1, D, stat + 2, stats);
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
                            double scale, const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
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
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_attention: cos and sin come together");
  Rotary rope;
  at::Tensor cos_rows, sin_rows;
  if (cos.has_value()) {
    TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat && cos->sizes() == sin->sizes() &&
                    cos->dim() == 4 && (cos->size(0) == B || cos->size(0) == 1) && cos->size(2) == 1 &&
                    cos->size(3) % 2 == 0 && cos->size(3) <= D,
                "decode_attention: cos and sin must be float32 (B, 1, 1, R), R even and at most D");
    cos_rows = cos->contiguous(), sin_rows = sin->contiguous();
    rope.cos = cos_rows.data_ptr<float>(), rope.sin = sin_rows.data_ptr<float>();
    rope.R = cos->size(3), rope.row_stride = cos->size(0) == 1 ? 0 : rope.R;
  }
  at::Tensor out = at::empty({B, 1, H * D}, q.options());
  const float s = static_cast<float>(scale);
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend<float>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, rope, out); break;
    case at::kBFloat16:
      attend<c10::BFloat16>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, rope, out);
      break;
    case at::kHalf:
      attend<c10::Half>(q, k_new, v_new, k_cache, v_cache, slot, pv, valid_stride, window, s, rope, out);
      break;
    default: TORCH_CHECK(false, "decode_attention: a float32, bfloat16 or float16 cache");
  }
  return out;
}

// ---- linear ----
//
// The weight arrives column-major, as W^T (in, out) with unit stride along out (llmkit/nn/linear.py's
// use_column_major_weights; or a block of columns of a wider such matrix: quant/fused.py's parts), float32 or a
// float16/bfloat16 matrix widened as it is read. Its rows are split in one slab per thread: each thread streams its
// slab front to back (the fastest way to read memory here: 37 GB/s over SmolLM2's tied head vs 15 for F.linear's
// GEMV, 2 threads) into its own partial product,
//
//   y = x W^T = sum_s x[:, slab s] W^T[slab s, :],
//
// and the partials are summed at the end. Within a slab, eight rows of W^T at a time are applied to a tile of up to
// kTile outputs for every row of x (the tile's weights stay in L1 across the rows).

constexpr int64_t kLinearMaxRows = 16;  // rows of x per call: the batch of a decode step
constexpr int64_t kTile = 4096;  // outputs per tile
constexpr int64_t kPass = 8;  // rows of W^T per pass over a tile
constexpr int64_t kFetchBytes = 16384;  // passes at most this long fetch the next one ahead (slab_product)

// partial (R, N) += x[:, j0:j1] W^T[j0:j1, :], row j of W^T at wt + j * ld (float16/bfloat16 weights widened to
// float32 as they are read: attention's widen / load8)
template <typename T>
void slab_product(const T* wt, int64_t ld, const float* x, int64_t rows, int64_t k, int64_t n, int64_t j0, int64_t j1,
                  float* partial) {
  constexpr int64_t kBytes = sizeof(T);
  for (int64_t o0 = 0; o0 < n; o0 += kTile) {
    const int64_t o1 = std::min(o0 + kTile, n);
    // A short pass (a narrow matrix: F16 q/k/v, o and down of SmolLM2) is eight short streams, on which the
    // hardware prefetcher barely ramps up: the first row of x fetches the next pass's weights as it goes, in step
    // (kPass * 8 weights per 8 outputs). F16 576x576 16 -> 20 GB/s; longer passes gain nothing or lose (they evict).
    const bool fetch_ahead = o1 - o0 == n && ld == n && kPass * n * kBytes <= kFetchBytes;
    int64_t j = j0;
    for (; j + kPass <= j1; j += kPass) {
      const T* w0 = wt + j * ld;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * k + j;
        float* p = partial + r * n;
        int64_t o = o0;
#ifdef LLMKIT_SIMD
        const char* next = reinterpret_cast<const char*>(w0 + kPass * ld);
        const bool fetch = fetch_ahead && r == 0;
#if defined(__AVX512F__)
        // 16 outputs at a time: half the loop's overhead per weight (a pass over SmolLM2's F16 down product,
        // 576 outputs, streamed ~40% faster on the Zen 4 VM, the 1536-output ones 5-15%)
        __m512 zs[kPass];
        for (int i = 0; i < kPass; ++i) zs[i] = _mm512_set1_ps(xr[i]);
        for (; o + 16 <= o1; o += 16) {
          if (fetch)
            for (int64_t line = 0; line < kPass * 16 * kBytes; line += 64)
              _mm_prefetch(next + (o - o0) * kPass * kBytes + line, _MM_HINT_T0);
          __m512 a = _mm512_fmadd_ps(zs[0], load16(w0 + o), _mm512_loadu_ps(p + o));
          __m512 b = _mm512_mul_ps(zs[1], load16(w0 + ld + o));
          for (int i = 2; i < kPass; i += 2) {
            a = _mm512_fmadd_ps(zs[i], load16(w0 + i * ld + o), a);
            b = _mm512_fmadd_ps(zs[i + 1], load16(w0 + (i + 1) * ld + o), b);
          }
          _mm512_storeu_ps(p + o, _mm512_add_ps(a, b));
        }
#endif
        __m256 xs[kPass];
        for (int i = 0; i < kPass; ++i) xs[i] = _mm256_set1_ps(xr[i]);
        for (; o + 8 <= o1; o += 8) {
          if (fetch)
            for (int64_t line = 0; line < kPass * 8 * kBytes; line += 64)
              _mm_prefetch(next + (o - o0) * kPass * kBytes + line, _MM_HINT_T0);
          __m256 a = _mm256_fmadd_ps(xs[0], load8(w0 + o), _mm256_loadu_ps(p + o));
          __m256 b = _mm256_mul_ps(xs[1], load8(w0 + ld + o));
          for (int i = 2; i < kPass; i += 2) {
            a = _mm256_fmadd_ps(xs[i], load8(w0 + i * ld + o), a);
            b = _mm256_fmadd_ps(xs[i + 1], load8(w0 + (i + 1) * ld + o), b);
          }
          _mm256_storeu_ps(p + o, _mm256_add_ps(a, b));
        }
#endif
        for (; o < o1; ++o) {
          float sum = p[o];
          for (int i = 0; i < kPass; ++i) sum += xr[i] * widen(w0[i * ld + o]);
          p[o] = sum;
        }
      }
    }
    for (; j < j1; ++j)  // the slab's last rows when its length is not a multiple of kPass
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = o0; o < o1; ++o) partial[r * n + o] += x[r * k + j] * widen(wt[j * ld + o]);
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight_t, const c10::optional<at::Tensor>& bias) {
  const auto type = weight_t.scalar_type();
  TORCH_CHECK(x.scalar_type() == at::kFloat && (type == at::kFloat || type == at::kHalf || type == at::kBFloat16) &&
                  weight_t.dim() == 2 && x.size(-1) == weight_t.size(0) &&
                  (weight_t.size(1) <= 1 || weight_t.stride(1) == 1) && weight_t.stride(0) >= weight_t.size(1),
              "linear: float32 x (..., in) and the weight's transpose (in, out) in float32, float16 or bfloat16, "
              "unit stride along out");
  const int64_t k = weight_t.size(0), n = weight_t.size(1), ld = weight_t.stride(0);
  const at::Tensor xc = llmkit::as_rows(x, kLinearMaxRows, "linear");
  const int64_t rows = xc.size(0);
  const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k / 16));
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.numel() == n), "linear: bias must be float32 (out)");
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor partials = at::zeros({slabs, rows, n}, xc.options());
  const float* px = xc.data_ptr<float>();
  float* pp = partials.data_ptr<float>();
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t j0 = s * k / slabs, j1 = (s + 1) * k / slabs;
      float* partial = pp + s * rows * n;
      if (type == at::kFloat) slab_product(weight_t.data_ptr<float>(), ld, px, rows, k, n, j0, j1, partial);
      else if (type == at::kHalf) slab_product(weight_t.data_ptr<c10::Half>(), ld, px, rows, k, n, j0, j1, partial);
      else slab_product(weight_t.data_ptr<c10::BFloat16>(), ld, px, rows, k, n, j0, j1, partial);
    }
  });
  // y = the first partial + the others (+ bias), in place: no tensor ops (each a dispatch of a few microseconds)
  for (int64_t i = 0; i < rows * n; ++i) {
    float sum = pp[i];
    for (int64_t s = 1; s < slabs; ++s) sum += pp[s * rows * n + i];
    pp[i] = pb != nullptr ? sum + pb[i % n] : sum;
  }
  return partials.view({-1}).narrow(0, 0, rows * n).view(llmkit::rows_shape(x, n));
}

}  // namespace

LLMKIT_LIBRARY(LLMKIT_OPS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt slot, "
        "Tensor? valid, int window, float scale, Tensor? cos, Tensor? sin) -> Tensor");
  m.def("linear(Tensor x, Tensor weight_t, Tensor? bias) -> Tensor");
}

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
  m.impl("linear", &linear);
}
