// GGUF block matrix products on the CPU, reading the file's own blocks (llmkit/quant/native.py builds and loads
// this file; the math is in its docstring).
//
//   y (R, N) = x (R, K) W^T,  W in blocks of 32 inputs:  Q4_0: fp16 d, 16 bytes of nibbles, w = d (q - 8)
//                                                        Q4_1: fp16 d, fp16 m, 16 bytes of nibbles, w = d q + m
//                                                        Q8_0: fp16 d, 32 int8, w = d q
//   (nibbles: the low one of byte j is input j, the high one input j + 16)
//
// As llama.cpp does, each row of x is first quantized to int8 per block of 32 (its Q8_0: dx = fp16(max|x| / 127),
// qx = round-half-even(x / dx)), so every block product is an integer dot product of 32 pairs:
//
//   sum_j w_j x_j ~= d dx sum_j (q_j - 8) qx_j              (Q4_0)
//                  = d dx sum_j q_j qx_j + m dx sum_j qx_j   (Q4_1)
//                  = d dx sum_j q_j qx_j                     (Q8_0)
//
// The weight block is read once for all R rows (rows in compile-time groups of up to 4, so the accumulators stay in
// registers). Integer dot products: AVX512-VNNI (vpdpbusd) where the compiler targets it, else AVX2 (vpmaddubsw +
// vpmaddwd), else plain C++. Output rows are split over torch's intra-op threads (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kMaxRows = 16;
constexpr int kPrefetchBytes = 4096;  // how far ahead of the block being read to ask for memory

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

struct Activations {  // rows of x quantized per block: int8 codes, scales dx, and dx sum(qx) (Q4_0 / Q4_1 terms)
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<float> scaled_sums;
};

Activations quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t blocks = k / kBlock;
  Activations a{std::vector<int8_t>(rows * k), std::vector<float>(rows * blocks), std::vector<float>(rows * blocks)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * kBlock;
      float amax = 0.f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float inverse = d != 0.f ? 1.f / d : 0.f;
      int8_t* q = a.codes.data() + r * k + b * kBlock;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inverse));
        sum += q[j];
      }
      const float dx = static_cast<float>(c10::Half(d));  // rounded to fp16, as llama.cpp's Q8_0 blocks store it
      a.scales[r * blocks + b] = dx;
      a.scaled_sums[r * blocks + b] = dx * sum;
    }
  }
  return a;
}

#if defined(__AVX2__)
// sum_j u_j s_j of 32 unsigned and 32 signed bytes, as 8 int32 lanes
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> 32 codes 0..15: low nibbles first, then high ones
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// kind: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0
template <int kKind>
constexpr int64_t block_bytes() { return kKind == 0 ? 18 : kKind == 1 ? 20 : 34; }

#if defined(__AVX2__)
// y[r] for rows r0 .. r0 + kRows of one output row (its blocks at `row`); two accumulator sets take alternate blocks
// to hide the FMA latency.
template <int kKind, int kRows>
inline void output_row(const uint8_t* row, const Activations& a, int64_t r0, int64_t blocks, int64_t k, float* y,
                       int64_t n) {
  __m256 acc[2][kRows];
  float extra[kRows];
  for (int r = 0; r < kRows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps(), extra[r] = 0.f;
  auto step = [&](int64_t b, __m256* sums) {
    const uint8_t* block = row + b * block_bytes<kKind>();
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);  // rows follow each other
    const float d = half_at(block);
    // signed codes (Q4_0: q - 8, Q8_0: q) multiply as |q| times x with q's sign: the same products, with the
    // unsigned operand on the left as the instructions want; Q4_1's codes are unsigned already
    __m256i q;
    if (kKind == 2) q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    else if (kKind == 0) q = _mm256_sub_epi8(nibbles(block + 2), _mm256_set1_epi8(8));
    else q = nibbles(block + 4);
    const __m256i u = kKind == 1 ? q : _mm256_abs_epi8(q);
    for (int r = 0; r < kRows; ++r) {
      const int64_t at = (r0 + r) * (k / kBlock) + b;
      __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.codes.data() + at * kBlock));
      if (kKind != 1) s = _mm256_sign_epi8(s, q);
      sums[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.scales[at]), _mm256_cvtepi32_ps(dot_u8_s8(u, s)), sums[r]);
      if (kKind == 1) extra[r] += half_at(block + 2) * a.scaled_sums[at];
    }
  };
  int64_t b = 0;
  for (; b + 1 < blocks; b += 2) {
    step(b, acc[0]);
    step(b + 1, acc[1]);
  }
  if (b < blocks) step(b, acc[0]);
  for (int r = 0; r < kRows; ++r) y[(r0 + r) * n] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + extra[r];
}
#endif

template <int kKind>
void block_rows(const uint8_t* w, const Activations& a, float* y, int64_t rows, int64_t n, int64_t k) {
  const int64_t blocks = k / kBlock;
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = w + o * blocks * block_bytes<kKind>();
#if defined(__AVX2__)
      // rows in groups of up to 4 (the weight row stays in L1 between groups)
      int64_t r0 = 0;
      for (; r0 + 4 <= rows; r0 += 4) output_row<kKind, 4>(row, a, r0, blocks, k, y + o, n);
      switch (rows - r0) {
        case 3: output_row<kKind, 3>(row, a, r0, blocks, k, y + o, n); break;
        case 2: output_row<kKind, 2>(row, a, r0, blocks, k, y + o, n); break;
        case 1: output_row<kKind, 1>(row, a, r0, blocks, k, y + o, n); break;
        default: break;
      }
#else
      float acc[kMaxRows] = {0.f};
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = row + b * block_bytes<kKind>();
        const float d = half_at(block);
        const float m = kKind == 1 ? half_at(block + 2) : 0.f;
        int32_t q[kBlock];
        if (kKind == 2) {
          for (int j = 0; j < kBlock; ++j) q[j] = reinterpret_cast<const int8_t*>(block + 2)[j];
        } else {
          const uint8_t* qs = block + (kKind == 0 ? 2 : 4);
          const int offset = kKind == 0 ? 8 : 0;
          for (int j = 0; j < kBlock / 2; ++j) {
            q[j] = (qs[j] & 0x0F) - offset;
            q[j + kBlock / 2] = (qs[j] >> 4) - offset;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int8_t* s = a.codes.data() + r * k + b * kBlock;
          int32_t dot = 0;
          for (int j = 0; j < kBlock; ++j) dot += q[j] * s[j];
          acc[r] += d * a.scales[r * blocks + b] * dot + m * a.scaled_sums[r * blocks + b];
        }
      }
      for (int64_t r = 0; r < rows; ++r) y[r * n + o] = acc[r];
#endif
    }
  });
}

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& blocks, int64_t kind, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gguf_matmul: x must be a 2-D float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gguf_matmul: at most ", kMaxRows, " rows per call");
  TORCH_CHECK(x.size(1) % kBlock == 0, "gguf_matmul: the input width must be a multiple of 32");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous(), "gguf_matmul: blocks must be contiguous uint8");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const Activations a = quantize_rows(xc.data_ptr<float>(), rows, k);
  if (kind == 0) block_rows<0>(w, a, y.data_ptr<float>(), rows, out_features, k);
  else if (kind == 1) block_rows<1>(w, a, y.data_ptr<float>(), rows, out_features, k);
  else block_rows<2>(w, a, y.data_ptr<float>(), rows, out_features, k);
  return y;
}

}  // namespace

TORCH_LIBRARY(llmkit_gguf, m) {
  m.def("matmul(Tensor x, Tensor blocks, int kind, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmkit_gguf, CPU, m) {
  m.impl("matmul", &gguf_matmul);
}
