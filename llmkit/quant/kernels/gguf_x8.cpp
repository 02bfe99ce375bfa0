// Q4_0, Q4_1 and Q8_0 products from blocks regrouped eight output rows at a time (llmkit/quant/native.py's `to_x8`
// writes this layout from the file's and `from_x8` gives the file's back), int8 activations as in gguf_cpu.cpp.
//
// Per group of 8 output rows and block of 32 inputs, the bytes are the 8 rows' scales side by side, then their codes
// interleaved 4 inputs at a time:
//
//   Q4_0  144 bytes = d[8] (fp16) | 4 chunks of 32 bytes: chunk c = row 0's nibble bytes 4c..4c+3, row 1's, ... row 7's
//   Q4_1  160 bytes = d[8] | m[8] | the same 4 chunks
//   Q8_0  272 bytes = d[8] | 8 chunks of 32 bytes: chunk c = row 0's codes 4c..4c+3, row 1's, ... row 7's
//
// (a nibble byte j holds inputs j and j + 16, so the low nibbles of chunk c are inputs 4c..4c+3 and the high ones
// 16+4c..16+4c+3). One register of codes then holds, in int32 lane i, row i's four codes of four consecutive inputs,
// and one vpdpbusd with those four x codes broadcast to every lane adds four products to each of the 8 rows' sums:
// 8 instructions per block for 8 rows, the scales applied once per block as one vector of 8 (no horizontal sums).
// Q4_0's codes run unsigned and the offset is taken out per block: sum (q - 8) qx = sum q qx - 8 sum qx.
// It takes any number of rows of x: a prompt's too (prefill), where it runs 1.3-3.6x faster than dequantizing the
// matrix and one float32 GEMM (512 rows, SmolLM2's matrices, 2 threads on the AVX2 VM), as llama.cpp's int8 path does.
// (Q5_0 took this path too, 10% faster on Gemma 3, but its sums in this order flipped a near-tie of Gemma's greedy
// continuation against llama.cpp's, whose per-row order the row kernel keeps: it stays there.)

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "activations.h"
#include "gguf_formats.h"

namespace {

using namespace llmkit;

// how far ahead to ask for memory: 8 KiB streamed 18-20 GB/s with 2 threads here, 1-2 KiB 13-16 (2026-12-06)
constexpr int kPrefetchBytes = 8192;

template <class F>
constexpr int offset() { return F::kKind == kQ4_0 ? 8 : 0; }  // w = d (q - offset) (+ m)

// code of output row i (0..7) at input j (0..31) of one group's block (the plain path and the definition)
template <class F>
inline int code_at(const uint8_t* block, int i, int j) {
  const uint8_t* chunks = block + x8_codes_at<F>();
  if (F::kKind == kQ8_0) return reinterpret_cast<const int8_t*>(chunks)[(j / 4) * 32 + 4 * i + j % 4];
  const int at = j % 16;  // the nibble byte that holds input j
  const uint8_t byte = chunks[(at / 4) * 32 + 4 * i + at % 4];
  return j < 16 ? byte & 0xF : byte >> 4;
}

#if defined(__AVX2__) && defined(__F16C__)
// y[r, 8g .. 8g + 7] for rows r0 .. r0 + kRows of x and one group of 8 output rows
template <class F, int kRows>
inline void group_rows(const uint8_t* group, const Activations& a, int64_t r0, int64_t k, float* y, int64_t n,
                       int64_t valid) {
  const int64_t blocks = k / kSub;
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = group + b * x8_group_bytes<F>();
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));  // 8 rows' scales
    __m256i w[8];  // w[c]: lane i = row i's codes of inputs 4c .. 4c + 3 (Q4: unsigned; Q8_0: |q|)
    __m256i sign[8];  // Q8_0: the codes themselves, whose signs go onto x
    const __m256 m = F::kKind == kQ4_1  // Q4_1: 8 rows' minimums
                         ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16)))
                         : _mm256_setzero_ps();
    const uint8_t* chunks = block + x8_codes_at<F>();
    if (F::kKind == kQ8_0) {
      for (int c = 0; c < 8; ++c) sign[c] = load32(chunks + 32 * c), w[c] = _mm256_abs_epi8(sign[c]);
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m256i bytes = load32(chunks + 32 * c);
        w[c] = _mm256_and_si256(bytes, low_mask);
        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t at = (r0 + r) * blocks + b;
      const int32_t* x4 = reinterpret_cast<const int32_t*>(a.codes.data() + at * kSub);  // 8 groups of 4 codes
      __m256i sums = _mm256_setzero_si256();
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
      if (F::kKind != kQ8_0) {  // AVX2: 4-bit codes (<= 15) times int8 (|x| <= 127) sum to <= 3,810 per int16 pair, so
        __m256i pairs = _mm256_setzero_si256();  // the 8 chunks' pair sums add up in int16 (<= 30,480) and widen once
        for (int c = 0; c < 8; ++c)
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(x4[c])));
        sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      } else
#endif
      for (int c = 0; c < 8; ++c) {
        __m256i x = _mm256_set1_epi32(x4[c]);
        if (F::kKind == kQ8_0) x = _mm256_sign_epi8(x, sign[c]);
        sums = dot_u8_s8(sums, w[c], x);
      }
      if (offset<F>()) sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(offset<F>() * a.sums[at]));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.scales[at])), _mm256_cvtepi32_ps(sums), acc[r]);
      if (F::kKind == kQ4_1) acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.scaled_sums[at]), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* out = y + (r0 + r) * n;
    if (valid == kX8Group) {
      _mm256_storeu_ps(out, acc[r]);
    } else {  // the last group of a matrix whose rows are not a multiple of 8 (its padding rows are dropped)
      alignas(32) float lanes[kX8Group];
      _mm256_store_ps(lanes, acc[r]);
      for (int64_t i = 0; i < valid; ++i) out[i] = lanes[i];
    }
  }
}
#endif

template <class F>
void group_rows_plain(const uint8_t* group, const Activations& a, int64_t rows, int64_t k, float* y, int64_t n,
                      int64_t valid) {
  const int64_t blocks = k / kSub;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < valid; ++i) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = group + b * x8_group_bytes<F>();
        const int64_t at = r * blocks + b;
        const int8_t* x = a.codes.data() + at * kSub;
        int32_t dot = 0;
        for (int j = 0; j < kSub; ++j) dot += (code_at<F>(block, i, j) - offset<F>()) * x[j];
        acc += half_at(block + 2 * i) * a.scales[at] * dot;
        if (F::kKind == kQ4_1) acc += half_at(block + 16 + 2 * i) * a.scaled_sums[at];
      }
      y[r * n + i] = acc;
    }
  }
}

template <class F>
void x8_rows(const uint8_t* w, const Activations& a, float* y, int64_t rows, int64_t n, int64_t k) {
  const int64_t groups = x8_groups(n);
  const int64_t bytes_per_group = k / kSub * x8_group_bytes<F>();
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group = w + g * bytes_per_group;
      const int64_t valid = std::min<int64_t>(kX8Group, n - g * kX8Group);
      float* out = y + g * kX8Group;
#if defined(__AVX2__) && defined(__F16C__)
      int64_t r0 = 0;  // rows of x in groups of up to 4, the weights decoded once per group of them
      for (; r0 + 4 <= rows; r0 += 4) group_rows<F, 4>(group, a, r0, k, out, n, valid);
      switch (rows - r0) {
        case 3: group_rows<F, 3>(group, a, r0, k, out, n, valid); break;
        case 2: group_rows<F, 2>(group, a, r0, k, out, n, valid); break;
        case 1: group_rows<F, 1>(group, a, r0, k, out, n, valid); break;
        default: break;
      }
#else
      group_rows_plain<F>(group, a, rows, k, out, n, valid);
#endif
    }
  });
}

at::Tensor x8_matmul(const at::Tensor& x, const at::Tensor& blocks, int64_t kind, int64_t out_features) {
  // any number of rows: decode steps (1-16) and prefill (the whole prompt), each group's weights decoded once per 4
  const at::Tensor xc = llmkit::as_rows(x, std::numeric_limits<int64_t>::max(), "matmul_x8");
  TORCH_CHECK(xc.size(1) % kSub == 0, "matmul_x8: the input width must be a multiple of 32");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous(), "matmul_x8: blocks must be contiguous uint8");
  const int64_t rows = xc.size(0), k = xc.size(1);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  with_x8_format(kind, "matmul_x8", [&](auto format) {
    using F = decltype(format);
    const int64_t expected = x8_groups(out_features) * (k / kSub) * x8_group_bytes<F>();
    TORCH_CHECK(blocks.numel() == expected, "matmul_x8: blocks hold ", blocks.numel(), " bytes, expected ", expected);
    const Activations a = quantize_rows(xc.data_ptr<float>(), rows, k);
    x8_rows<F>(blocks.data_ptr<uint8_t>(), a, y.data_ptr<float>(), rows, out_features, k);
  });
  return y.view(rows_shape(x, out_features));
}

}  // namespace

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("matmul_x8", &x8_matmul);
}
