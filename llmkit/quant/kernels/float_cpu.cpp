// Matrix products with float32 activations from weights kept in 8 or 16 bits (llmkit/quant/native.py):
//
//   kind 0  Q8_0 blocks (gguf_formats.h)  w_j = d q_j, formed in float32 exactly as ggml's dequantizer does
//   kind 1  F16 matrix (out, in)          w = the half value
//   kind 2  BF16 matrix (out, in)         likewise
//
//   y (R, N) = x (R, K) W^T  in float32: the dequantized-weight F.linear up to the order of the sums, without ever
//   holding W in float32. For the LM head (its logits choose the token: no int8 rounding of x) and for F16/BF16
//   layers (aten's half GEMV was no faster than float32 on this CPU; this one reads 2 bytes a weight).
//
// Each weight block of 32 is turned into four 8-float vectors once and multiplied with every row of x (rows in
// groups of up to 2, four accumulators each to hide the FMA latency); output rows are split over torch's threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "gguf_formats.h"

namespace {

using namespace llmkit;

constexpr int kPrefetchBytes = 4096;

enum FloatKind : int64_t { kQ8_0, kF16, kBF16 };

template <int kKind>
constexpr int64_t row_bytes(int64_t k) { return kKind == kQ8_0 ? k / kSub * 34 : 2 * k; }

template <int kKind>
inline float weight_at(const uint8_t* row, int64_t j) {  // w_j of a row (the plain path and the tails)
  if (kKind == kQ8_0) {
    const uint8_t* block = row + j / kSub * 34;
    return half_at(block) * static_cast<float>(reinterpret_cast<const int8_t*>(block + 2)[j % kSub]);
  }
  uint16_t bits;
  std::memcpy(&bits, row + 2 * j, 2);
  if (kKind == kF16) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <int kKind>
inline const uint8_t* block_at(const uint8_t* row, int64_t b) { return row + b * (kKind == kQ8_0 ? 34 : 64); }

template <int kKind>
inline void weights(const uint8_t* block, __m256* w) {  // the block's 32 weights as 4 x 8 floats
  for (int i = 0; i < 4; ++i) {
    if (kKind == kQ8_0) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_set1_ps(half_at(block)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * i));
      w[i] = kKind == kF16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

template <int kKind, int kRows>
inline void output_row(const uint8_t* row, const float* x, int64_t r0, int64_t k, float* y, int64_t n) {
  __m256 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t blocks = k / kSub;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = block_at<kKind>(row, b);
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    __m256 w[4];
    weights<kKind>(block, w);
    for (int r = 0; r < kRows; ++r) {
      const float* v = x + (r0 + r) * k + b * kSub;
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(v + 8 * i), acc[r][i]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float tail = 0.f;  // F16/BF16 widths that are not a multiple of 32
    for (int64_t j = blocks * kSub; j < k; ++j) tail += weight_at<kKind>(row, j) * x[(r0 + r) * k + j];
    y[(r0 + r) * n] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]))) + tail;
  }
}
#endif

template <int kKind>
void float_rows(const uint8_t* w, const float* x, float* y, int64_t rows, int64_t n, int64_t k) {
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = w + o * row_bytes<kKind>(k);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
      int64_t r0 = 0;
      for (; r0 + 2 <= rows; r0 += 2) output_row<kKind, 2>(row, x, r0, k, y + o, n);
      if (r0 < rows) output_row<kKind, 1>(row, x, r0, k, y + o, n);
#else
      for (int64_t r = 0; r < rows; ++r) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += weight_at<kKind>(row, j) * x[r * k + j];
        y[r * n + o] = acc;
      }
#endif
    }
  });
}

at::Tensor float_matmul(const at::Tensor& x, const at::Tensor& weight, int64_t kind, int64_t out_features) {
  const at::Tensor xc = as_rows(x, "matmul_float");
  TORCH_CHECK(weight.is_contiguous(), "matmul_float: the weight must be contiguous");
  const int64_t rows = xc.size(0), k = xc.size(1);
  const auto expected = kind == kQ8_0 ? at::kByte : kind == kF16 ? at::kHalf : at::kBFloat16;
  TORCH_CHECK(kind >= kQ8_0 && kind <= kBF16 && weight.scalar_type() == expected, "matmul_float: kind ", kind,
              " does not match a ", weight.scalar_type(), " weight");
  TORCH_CHECK(kind != kQ8_0 || k % kSub == 0, "matmul_float: Q8_0 needs an input width that is a multiple of 32");
  const int64_t bytes = kind == kQ8_0 ? row_bytes<kQ8_0>(k) : row_bytes<kF16>(k);
  TORCH_CHECK(weight.numel() * weight.element_size() == out_features * bytes, "matmul_float: the weight holds ",
              weight.numel() * weight.element_size(), " bytes, expected ", out_features * bytes);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  const auto* w = static_cast<const uint8_t*>(weight.data_ptr());
  if (kind == kQ8_0) float_rows<kQ8_0>(w, xc.data_ptr<float>(), y.data_ptr<float>(), rows, out_features, k);
  else if (kind == kF16) float_rows<kF16>(w, xc.data_ptr<float>(), y.data_ptr<float>(), rows, out_features, k);
  else float_rows<kBF16>(w, xc.data_ptr<float>(), y.data_ptr<float>(), rows, out_features, k);
  return y.view(rows_shape(x, out_features));
}

}  // namespace

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("matmul_float", &float_matmul);
}
