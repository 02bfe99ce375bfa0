// GGUF block matrix products on the CPU with int8 activations, reading the file's own blocks (llmkit/quant/native.py
// builds and loads this file; the formats are in gguf_formats.h).
//
//   y (R, N) = x (R, K) W^T,  every row of W decoded in sub-blocks of 32 inputs: w_j = scale_(j / 16) q_j + min
//
// As llama.cpp does, each row of x is first quantized to int8 per block of 32 (its Q8_0: dx = fp16(max|x| / 127),
// qx = round-half-even(x / dx)), so every sub-block product is an integer dot product of 32 pairs:
//
//   sum_j w_j x_j ~= dx (scale_0 sum_(j < 16) q_j qx_j + scale_1 sum_(j >= 16) q_j qx_j) + min dx sum_j qx_j
//
// The weight block is decoded once for all R rows (rows in compile-time groups of up to 4, so the accumulators stay
// in registers). Integer dot products: AVX512-VNNI (vpdpbusd) where the compiler targets it, else AVX2 (vpmaddubsw +
// vpmaddwd), else plain C++. Output rows are split over torch's intra-op threads (at::parallel_for).
// float_cpu.cpp holds the float-activation products (Q8_0, F16, BF16) and registers them beside this one.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "activations.h"
#include "gguf_formats.h"

namespace {

using namespace llmkit;

constexpr int kPrefetchBytes = 4096;  // how far ahead of the block being read to ask for memory

#if defined(__AVX2__)
// y[r] for rows r0 .. r0 + kRows of one output row (its blocks at `row`); two accumulator sets take alternate
// sub-blocks to hide the FMA latency.
template <class F, int kRows>
inline void output_row(const uint8_t* row, const Activations& a, int64_t r0, int64_t k, float* y, int64_t n) {
  constexpr int kSubs = F::kValues / kSub;
  const int64_t subs_per_row = k / kSub;
  __m256 acc[2][kRows];
  float extra[kRows];
  for (int r = 0; r < kRows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps(), extra[r] = 0.f;
  auto step = [&](int64_t block_index, int set) {
    const uint8_t* block = row + block_index * F::kBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);  // rows follow each other
    SimdSub subs[kSubs];
    decode_simd<F>(block, subs);
    for (int s = 0; s < kSubs; ++s) {
      // signed codes multiply as |q| times x with q's sign: the same products, with the unsigned operand on the
      // left as the instructions want
      const __m256i u = F::kUnsigned ? subs[s].q : _mm256_abs_epi8(subs[s].q);
      __m256* sums = acc[kSubs == 1 ? set : s % 2];
      for (int r = 0; r < kRows; ++r) {
        const int64_t at = (r0 + r) * subs_per_row + block_index * kSubs + s;
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.codes.data() + at * kSub));
        if (!F::kUnsigned) v = _mm256_sign_epi8(v, subs[s].q);
        const __m256 scale = _mm256_mul_ps(subs[s].scale, _mm256_set1_ps(a.scales[at]));
        sums[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot_u8_s8(_mm256_setzero_si256(), u, v)), sums[r]);
        if (F::kUnsigned) extra[r] += subs[s].min * a.scaled_sums[at];
      }
    }
  };
  const int64_t blocks = k / F::kValues;
  int64_t b = 0;
  for (; b + 1 < blocks; b += 2) {
    step(b, 0);
    step(b + 1, 1);
  }
  if (b < blocks) step(b, 0);
  for (int r = 0; r < kRows; ++r) y[(r0 + r) * n] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + extra[r];
}
#endif

// the plain C++ product of one output row with every row of x (no SIMD target)
template <class F>
void output_row_plain(const uint8_t* row, const Activations& a, int64_t rows, int64_t k, float* y, int64_t n) {
  constexpr int kSubs = F::kValues / kSub;
  const int64_t subs_per_row = k / kSub;
  float acc[kMaxRows] = {0.f};
  SubBlock subs[kSubs];
  for (int64_t block_index = 0; block_index < k / F::kValues; ++block_index) {
    F::decode(row + block_index * F::kBytes, subs);
    for (int s = 0; s < kSubs; ++s) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = r * subs_per_row + block_index * kSubs + s;
        const int8_t* v = a.codes.data() + at * kSub;
        int32_t dot[2] = {0, 0};
        for (int j = 0; j < kSub; ++j) dot[j / 16] += subs[s].q[j] * v[j];
        acc[r] += a.scales[at] * (subs[s].scale[0] * dot[0] + subs[s].scale[1] * dot[1]) +
                  subs[s].min * a.scaled_sums[at];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[r * n] = acc[r];
}

template <class F>
void block_rows(const uint8_t* w, const Activations& a, float* y, int64_t rows, int64_t n, int64_t k) {
  const int64_t row_bytes = k / F::kValues * F::kBytes;
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = w + o * row_bytes;
#if defined(__AVX2__)
      // rows in groups of up to 4 (the weight row stays in L1 between groups)
      int64_t r0 = 0;
      for (; r0 + 4 <= rows; r0 += 4) output_row<F, 4>(row, a, r0, k, y + o, n);
      switch (rows - r0) {
        case 3: output_row<F, 3>(row, a, r0, k, y + o, n); break;
        case 2: output_row<F, 2>(row, a, r0, k, y + o, n); break;
        case 1: output_row<F, 1>(row, a, r0, k, y + o, n); break;
        default: break;
      }
#else
      output_row_plain<F>(row, a, rows, k, y + o, n);
#endif
    }
  });
}

template <class F>
void run(const at::Tensor& blocks, const Activations& a, at::Tensor& y, int64_t rows, int64_t k) {
  const int64_t n = y.size(1);
  TORCH_CHECK(k % F::kValues == 0, "gguf_matmul: the input width must be a multiple of ", F::kValues);
  TORCH_CHECK(blocks.numel() == n * (k / F::kValues) * F::kBytes, "gguf_matmul: blocks hold ", blocks.numel(),
              " bytes, expected ", n * (k / F::kValues) * F::kBytes);
  block_rows<F>(blocks.data_ptr<uint8_t>(), a, y.data_ptr<float>(), rows, n, k);
}

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& blocks, int64_t kind, int64_t out_features) {
  const at::Tensor xc = as_rows(x, "gguf_matmul");
  TORCH_CHECK(xc.size(1) % kSub == 0, "gguf_matmul: the input width must be a multiple of 32");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous(), "gguf_matmul: blocks must be contiguous uint8");
  const int64_t rows = xc.size(0), k = xc.size(1);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  const Activations a = quantize_rows(xc.data_ptr<float>(), rows, k);
  with_format(kind, "gguf_matmul", [&](auto format) { run<decltype(format)>(blocks, a, y, rows, k); });
  return y.view(rows_shape(x, out_features));
}

}  // namespace

LLMKIT_LIBRARY(LLMKIT_OPS, m) {
  m.def("matmul(Tensor x, Tensor blocks, int kind, int out_features) -> Tensor");
  m.def("matmul_float(Tensor x, Tensor blocks, int out_features) -> Tensor");  // float_cpu.cpp (Q8_0)
  m.def("matmul_x8(Tensor x, Tensor blocks, int kind, int out_features) -> Tensor");  // gguf_x8.cpp
  m.def("dequantize(Tensor blocks, int kind, int out_features) -> Tensor");  // dequantize_cpu.cpp
  m.def("dequantize_x8(Tensor blocks, int kind, int out_features) -> Tensor");  // dequantize_cpu.cpp
}

LLMKIT_LIBRARY_IMPL(LLMKIT_OPS, m) {
  m.impl("matmul", &gguf_matmul);
}
