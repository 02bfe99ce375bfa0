// GGUF block matrices widened to float32 (llmkit/quant/native.py's `dequantize` and `dequantize_x8`): what a
// prompt's many rows multiply with (one float32 GEMM per product, quant/linear.py's dequantize_forward) and what an
// embedding lookup into a quantized table reads.
//
//   W (N, K) float32,  w_j = scale_(j / 16) q_j + min   for every sub-block of 32 inputs (gguf_formats.h)
//
// Each product scale q_j is exact in float32 (an fp16 scale, or an fp16 times a 6- or 8-bit block scale, times a
// code of at most 6 bits: at most 24 significant bits), so the only rounding is the one addition of the minimum,
// the one ggml's dequantizers and gguf.quants.dequantize make: the values equal theirs bit for bit (tests). Output
// rows (or groups of 8 rows for the regrouped layout of gguf_x8.cpp) are split over torch's threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gguf_formats.h"

#include <algorithm>
#include <cstring>

namespace {

using namespace llmkit;

// 32 values of one sub-block into `out`
inline void write_sub(const SubBlock& s, float* out) {
  for (int j = 0; j < kSub; ++j) out[j] = s.scale[j / 16] * static_cast<float>(s.q[j]) + s.min;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline void write_simd(const SimdSub& s, float* out) {
  alignas(32) float scale[8];  // lanes 0-3: the scale of values 0-15, lanes 4-7: of 16-31
  _mm256_store_ps(scale, s.scale);
  const __m256 min = _mm256_set1_ps(s.min);
  alignas(32) int8_t q[kSub];
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), s.q);
  for (int i = 0; i < 4; ++i) {
    const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
    _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(_mm256_set1_ps(scale[i < 2 ? 0 : 4]), codes, min));
  }
}
#endif

template <class F>
void rows_of(const uint8_t* w, float* y, int64_t n, int64_t k) {
  constexpr int kSubs = F::kValues / kSub;
  const int64_t row_bytes = k / F::kValues * F::kBytes;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t b = 0; b < k / F::kValues; ++b) {
        const uint8_t* block = w + o * row_bytes + b * F::kBytes;
        float* out = y + o * k + b * F::kValues;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        SimdSub subs[kSubs];
        decode_simd<F>(block, subs);
        for (int s = 0; s < kSubs; ++s) write_simd(subs[s], out + s * kSub);
#else
        SubBlock subs[kSubs];
        F::decode(block, subs);
        for (int s = 0; s < kSubs; ++s) write_sub(subs[s], out + s * kSub);
#endif
      }
    }
  });
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t kind, int64_t out_features) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 2 &&
                  blocks.size(0) == out_features,
              "dequantize: blocks must be contiguous uint8 (out_features, bytes per row)");
  at::Tensor y;
  with_format(kind, "dequantize", [&](auto format) {
    using F = decltype(format);
    TORCH_CHECK(blocks.size(1) % F::kBytes == 0, "dequantize: ", blocks.size(1), " bytes per row is not a whole ",
                "number of ", F::kBytes, "-byte blocks");
    const int64_t k = blocks.size(1) / F::kBytes * F::kValues;
    y = at::empty({out_features, k}, blocks.options().dtype(at::kFloat));
    rows_of<F>(blocks.data_ptr<uint8_t>(), y.data_ptr<float>(), out_features, k);
  });
  return y;
}

// The regrouped layout (gguf_formats.h's kX8Group; gguf_x8.cpp's header): chunk c of a group's block holds row i's
// code bytes 4c .. 4c + 3 at 4 i.

// One row's block in the file's bytes (F's layout) from a group's block: its d (and m), then its code bytes, 4 at a
// time from each chunk. The regrouping is a reordering of bytes, so the row's values then decode as in the file.
template <class F>
inline void file_block(const uint8_t* group_block, int i, uint8_t* out) {
  constexpr int kHeader = F::kUnsigned ? 4 : 2;  // d (Q4_1: d, m)
  constexpr int kChunks = (F::kBytes - kHeader) / 4;
  std::memcpy(out, group_block + 2 * i, 2);
  if (F::kUnsigned) std::memcpy(out + 2, group_block + 2 * kX8Group + 2 * i, 2);
  const uint8_t* chunks = group_block + x8_codes_at<F>();
  for (int c = 0; c < kChunks; ++c) std::memcpy(out + kHeader + 4 * c, chunks + 32 * c + 4 * i, 4);
}

template <class F>
void groups_of(const uint8_t* w, float* y, int64_t n, int64_t k) {
  constexpr int64_t kGroupBytes = x8_group_bytes<F>();
  const int64_t blocks = k / kSub;
  at::parallel_for(0, x8_groups(n), 2, [&](int64_t begin, int64_t end) {
    uint8_t block[F::kBytes];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t valid = std::min<int64_t>(kX8Group, n - g * kX8Group);  // the last group's padding rows are dropped
      for (int64_t b = 0; b < blocks; ++b) {
        for (int i = 0; i < valid; ++i) {
          file_block<F>(w + (g * blocks + b) * kGroupBytes, i, block);
          float* out = y + (g * kX8Group + i) * k + b * kSub;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
          SimdSub sub;
          decode_simd<F>(block, &sub);
          write_simd(sub, out);
#else
          SubBlock sub;
          F::decode(block, &sub);
          write_sub(sub, out);
#endif
        }
      }
    }
  });
}

at::Tensor dequantize_x8(const at::Tensor& blocks, int64_t kind, int64_t out_features) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 2,
              "dequantize_x8: blocks must be contiguous uint8 (groups, bytes per group)");
  at::Tensor y;
  with_x8_format(kind, "dequantize_x8", [&](auto format) {
    using F = decltype(format);
    constexpr int64_t kGroupBytes = x8_group_bytes<F>();
    TORCH_CHECK(blocks.size(0) == x8_groups(out_features) && blocks.size(1) % kGroupBytes == 0,
                "dequantize_x8: ", blocks.size(0), " groups of ", blocks.size(1), " bytes do not hold ", out_features,
                " rows");
    const int64_t k = blocks.size(1) / kGroupBytes * kSub;
    y = at::empty({out_features, k}, blocks.options().dtype(at::kFloat));
    groups_of<F>(blocks.data_ptr<uint8_t>(), y.data_ptr<float>(), out_features, k);
  });
  return y;
}

}  // namespace

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("dequantize", &dequantize);
  m.impl("dequantize_x8", &dequantize_x8);
}
