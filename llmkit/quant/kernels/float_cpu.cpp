// The matrix product with float32 activations from Q8_0 blocks (gguf_formats.h; llmkit/quant/native.py), the
// weights w_j = d q_j formed in float32 exactly as ggml's dequantizer does:
//
//   y (R, N) = x (R, K) W^T  in float32: the dequantized-weight F.linear up to the order of the sums, without ever
//   holding W in float32. For a Q8_0 LM head (its logits choose the token: no int8 rounding of x). F16/BF16
//   matrices take the decode linear op of llmkit/nn/kernels/decode_cpu.cpp instead, kept column-major.
//
// Each weight block of 32 is turned into four 8-float vectors (AVX-512: two 16-float ones) once and multiplied with
// every row of x (rows in groups of up to 2, four (two) accumulators each to hide the FMA latency); output rows are
// split over torch's threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gguf_formats.h"

namespace {

using namespace llmkit;

constexpr int kPrefetchBytes = 4096;

constexpr int64_t kBlockBytes = 34;  // fp16 d, 32 int8 codes

inline float weight_at(const uint8_t* row, int64_t j) {  // w_j of a row (the plain path)
  const uint8_t* block = row + j / kSub * kBlockBytes;
  return half_at(block) * static_cast<float>(reinterpret_cast<const int8_t*>(block + 2)[j % kSub]);
}

#if defined(__AVX512F__)
// AVX-512: a block's 32 weights as two 16-float vectors, two accumulators per row of x (SmolLM2's and Gemma 3's Q8_0
// heads streamed 7-17% faster than with the 8-float path on the Zen 4 VM, 2026-12-07)
template <int kRows>
inline void output_row(const uint8_t* row, const float* x, int64_t r0, int64_t k, float* y, int64_t n) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t blocks = k / kSub;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * kBlockBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 d = _mm512_set1_ps(half_at(block));
    __m512 w[2];
    for (int i = 0; i < 2; ++i) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * i));
      w[i] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
    for (int r = 0; r < kRows; ++r) {
      const float* v = x + (r0 + r) * k + b * kSub;
      for (int i = 0; i < 2; ++i) acc[r][i] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(v + 16 * i), acc[r][i]);
    }
  }
  for (int r = 0; r < kRows; ++r) y[(r0 + r) * n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline void weights(const uint8_t* block, __m256* w) {  // the block's 32 weights as 4 x 8 floats
  const __m256 d = _mm256_set1_ps(half_at(block));
  for (int i = 0; i < 4; ++i) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * i));
    w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
  }
}

template <int kRows>
inline void output_row(const uint8_t* row, const float* x, int64_t r0, int64_t k, float* y, int64_t n) {
  __m256 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t blocks = k / kSub;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * kBlockBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    __m256 w[4];
    weights(block, w);
    for (int r = 0; r < kRows; ++r) {
      const float* v = x + (r0 + r) * k + b * kSub;
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(v + 8 * i), acc[r][i]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    y[(r0 + r) * n] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
}
#endif

void float_rows(const uint8_t* w, const float* x, float* y, int64_t rows, int64_t n, int64_t k) {
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = w + o * (k / kSub * kBlockBytes);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
      int64_t r0 = 0;
      for (; r0 + 2 <= rows; r0 += 2) output_row<2>(row, x, r0, k, y + o, n);
      if (r0 < rows) output_row<1>(row, x, r0, k, y + o, n);
#else
      for (int64_t r = 0; r < rows; ++r) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += weight_at(row, j) * x[r * k + j];
        y[r * n + o] = acc;
      }
#endif
    }
  });
}

at::Tensor float_matmul(const at::Tensor& x, const at::Tensor& blocks, int64_t out_features) {
  const at::Tensor xc = as_rows(x, "matmul_float");
  TORCH_CHECK(blocks.is_contiguous() && blocks.scalar_type() == at::kByte,
              "matmul_float: the Q8_0 blocks must be contiguous uint8");
  const int64_t rows = xc.size(0), k = xc.size(1);
  TORCH_CHECK(k % kSub == 0, "matmul_float: Q8_0 needs an input width that is a multiple of 32");
  const int64_t bytes = k / kSub * kBlockBytes;
  TORCH_CHECK(blocks.numel() == out_features * bytes, "matmul_float: the blocks hold ", blocks.numel(),
              " bytes, expected ", out_features * bytes);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  float_rows(blocks.data_ptr<uint8_t>(), xc.data_ptr<float>(), y.data_ptr<float>(), rows, out_features, k);
  return y.view(rows_shape(x, out_features));
}

}  // namespace

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("matmul_float", &float_matmul);
}
