// GGUF's block formats as llmkit's kernels read them: every format is decoded into sub-blocks of 32 values with
//
//   w_j = scale_(j / 16) q_j + min          (q_j small integers; scale one float per 16 values; min per sub-block)
//
// so one integer dot product of 32 pairs serves all of them (gguf_cpu.cpp). The byte layouts are ggml's
// (ggml-common.h); the arithmetic is the one its dequantizers do, so w_j here equals gguf.quants.dequantize's value:
//
//   format  bytes / values  layout                                              w
//   Q4_0    18 / 32         d | 16 nibble bytes                                 d (q - 8)
//   Q4_1    20 / 32         d | m | 16 nibble bytes                             d q + m
//   Q8_0    34 / 32         d | 32 int8                                         d q
//   Q5_0    22 / 32         d | qh (32 high bits) | 16 nibble bytes             d (q - 16)
//   Q5_1    24 / 32         d | m | qh | 16 nibble bytes                        d q + m
//   Q4_K   144 / 256        d | dmin | 12 bytes of 6-bit (sc, m) x 8 | 128 qs    (d sc_s) q - (dmin m_s), s = j / 32
//   Q5_K   176 / 256        d | dmin | 12 scale bytes | 32 qh | 128 qs          the same with 5-bit q
//   Q6_K   210 / 256        128 ql | 64 qh | 16 int8 sc | d                     (d sc_t) (q - 32), t = j / 16
//
// (d, dmin, m: fp16.) Nibbles of the 32-value formats: byte j holds value j (low) and j + 16 (high). Q4_K/Q5_K: the
// 32 bytes of qs at 32 i hold sub-block 2 i (low nibbles) and 2 i + 1 (high); Q5_K's extra bit of sub-block s is
// bit s of qh[j]. Q6_K: each half h of the super-block (128 values) takes 64 bytes of ql, 32 of qh and 8 scales;
// sub-block t (0..3) of the half is the low (t < 2) or high nibble of ql[32 (t % 2) + j] with bits 2t, 2t+1 of qh[j].
//
// `decode` (plain C++) is the definition and the fallback; `decode_simd` (AVX2) gives the same codes and scales in
// registers.

#pragma once

#include "llmkit_ops.h"  // llmkit/kernels: the op namespace, as_rows, rows_shape

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llmkit {

constexpr int kSub = 32;  // values per sub-block: the unit of every integer dot product
constexpr int kMaxRows = 16;  // rows of x per call (decode, speculative verification): native.MAX_ROWS

// x (..., k) float32 as the rows the kernels take (at most kMaxRows)
inline at::Tensor as_rows(const at::Tensor& x, const char* op) { return as_rows(x, kMaxRows, op); }

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

struct SubBlock {  // w_j = scale[j / 16] q[j] + min
  int8_t q[kSub];
  float scale[2];
  float min;
};

inline void set_sub(SubBlock& s, float scale_low, float scale_high, float min) {
  s.scale[0] = scale_low, s.scale[1] = scale_high, s.min = min;
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block s from the 12 packed bytes
inline void k_scale_min(const uint8_t* p, int s, int* scale, int* min) {
  if (s < 4) {
    *scale = p[s] & 63, *min = p[s + 4] & 63;
  } else {
    *scale = (p[s + 4] & 0xF) | ((p[s - 4] >> 6) << 4);
    *min = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
  }
}

// the `kind` argument of the ops: the order of native.py's INT8_KINDS
enum Kind : int64_t { kQ4_0, kQ4_1, kQ8_0, kQ5_0, kQ5_1, kQ4_K, kQ5_K, kQ6_K };

struct Q4_0 {
  static constexpr Kind kKind = kQ4_0;
  static constexpr int kValues = 32, kBytes = 18;
  static constexpr bool kUnsigned = false;  // signed codes, no min term
  static void decode(const uint8_t* b, SubBlock* s) {
    const float d = half_at(b);
    for (int j = 0; j < 16; ++j) s->q[j] = (b[2 + j] & 0xF) - 8, s->q[j + 16] = (b[2 + j] >> 4) - 8;
    set_sub(*s, d, d, 0.f);
  }
};

struct Q4_1 {
  static constexpr Kind kKind = kQ4_1;
  static constexpr int kValues = 32, kBytes = 20;
  static constexpr bool kUnsigned = true;
  static void decode(const uint8_t* b, SubBlock* s) {
    for (int j = 0; j < 16; ++j) s->q[j] = b[4 + j] & 0xF, s->q[j + 16] = b[4 + j] >> 4;
    set_sub(*s, half_at(b), half_at(b), half_at(b + 2));
  }
};

struct Q8_0 {
  static constexpr Kind kKind = kQ8_0;
  static constexpr int kValues = 32, kBytes = 34;
  static constexpr bool kUnsigned = false;
  static void decode(const uint8_t* b, SubBlock* s) {
    std::memcpy(s->q, b + 2, kSub);
    set_sub(*s, half_at(b), half_at(b), 0.f);
  }
};

inline void q5_codes(const uint8_t* qh_bytes, const uint8_t* qs, int offset, SubBlock* s) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    s->q[j] = ((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - offset;
    s->q[j + 16] = ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - offset;
  }
}

struct Q5_0 {
  static constexpr Kind kKind = kQ5_0;
  static constexpr int kValues = 32, kBytes = 22;
  static constexpr bool kUnsigned = false;
  static void decode(const uint8_t* b, SubBlock* s) {
    q5_codes(b + 2, b + 6, 16, s);
    set_sub(*s, half_at(b), half_at(b), 0.f);
  }
};

struct Q5_1 {
  static constexpr Kind kKind = kQ5_1;
  static constexpr int kValues = 32, kBytes = 24;
  static constexpr bool kUnsigned = true;
  static void decode(const uint8_t* b, SubBlock* s) {
    q5_codes(b + 4, b + 8, 0, s);
    set_sub(*s, half_at(b), half_at(b), half_at(b + 2));
  }
};

template <bool kFiveBit>
struct KQuant {  // Q4_K (kFiveBit false) and Q5_K
  static constexpr Kind kKind = kFiveBit ? kQ5_K : kQ4_K;
  static constexpr int kValues = 256, kBytes = kFiveBit ? 176 : 144;
  static constexpr bool kUnsigned = true;
  static void decode(const uint8_t* b, SubBlock* s) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (kFiveBit ? 48 : 16);
    for (int sub = 0; sub < 8; ++sub) {
      int scale, min;
      k_scale_min(b + 4, sub, &scale, &min);
      const uint8_t* bytes = qs + 32 * (sub / 2);
      for (int j = 0; j < kSub; ++j) {
        const int low = sub % 2 ? bytes[j] >> 4 : bytes[j] & 0xF;
        s[sub].q[j] = low | (kFiveBit ? ((qh[j] >> sub) & 1) << 4 : 0);
      }
      set_sub(s[sub], d * scale, d * scale, -(dmin * min));
    }
  }
};
using Q4_K = KQuant<false>;
using Q5_K = KQuant<true>;

struct Q6_K {
  static constexpr Kind kKind = kQ6_K;
  static constexpr int kValues = 256, kBytes = 210;
  static constexpr bool kUnsigned = false;
  static void decode(const uint8_t* b, SubBlock* s) {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      for (int t = 0; t < 4; ++t) {
        SubBlock& sub = s[4 * half + t];
        for (int j = 0; j < kSub; ++j) {
          const uint8_t low = ql[32 * (t % 2) + j];
          sub.q[j] = ((t < 2 ? low & 0xF : low >> 4) | (((qh[j] >> (2 * t)) & 3) << 4)) - 32;
        }
        set_sub(sub, d * sc[8 * half + 2 * t], d * sc[8 * half + 2 * t + 1], 0.f);
      }
    }
  }
};

// fn(F{}) with F the format `kind` names (fn is a generic lambda: [&](auto format) { using F = decltype(format); });
// an unknown kind is an error naming `op`
template <class Fn>
void with_format(int64_t kind, const char* op, Fn&& fn) {
  switch (kind) {
    case kQ4_0: fn(Q4_0{}); break;
    case kQ4_1: fn(Q4_1{}); break;
    case kQ8_0: fn(Q8_0{}); break;
    case kQ5_0: fn(Q5_0{}); break;
    case kQ5_1: fn(Q5_1{}); break;
    case kQ4_K: fn(Q4_K{}); break;
    case kQ5_K: fn(Q5_K{}); break;
    case kQ6_K: fn(Q6_K{}); break;
    default: TORCH_CHECK(false, op, ": unknown kind ", kind);
  }
}

// The 8-row layout (gguf_x8.cpp; native.py's to_x8 writes it): per group of kX8Group output rows and block of 32
// inputs, the rows' d (Q4_1: then their m) side by side, then their code bytes interleaved 4 at a time
constexpr int kX8Group = 8;
constexpr int64_t x8_groups(int64_t rows) { return (rows + kX8Group - 1) / kX8Group; }  // the last one padded
template <class F>
constexpr int64_t x8_group_bytes() { return kX8Group * F::kBytes; }
template <class F>
constexpr int x8_codes_at() { return F::kUnsigned ? 32 : 16; }  // where the code chunks start in a group's block

// with_format for the three formats of the 8-row layout
template <class Fn>
void with_x8_format(int64_t kind, const char* op, Fn&& fn) {
  switch (kind) {
    case kQ4_0: fn(Q4_0{}); break;
    case kQ4_1: fn(Q4_1{}); break;
    case kQ8_0: fn(Q8_0{}); break;
    default: TORCH_CHECK(false, op, ": unknown kind ", kind, " for the 8-row layout (q4_0, q4_1, q8_0 only)");
  }
}

#if defined(__AVX2__)
// acc + sum_j u_j s_j of 32 unsigned and 32 signed bytes, as 8 int32 lanes (lane i: bytes 4i .. 4i + 3); AVX2's
// pairwise int16 sums cannot saturate here: |u| <= 128 and |s| <= 127 in every use
inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct SimdSub {  // a SubBlock in registers: 32 codes, the scale of each int32 lane of a dot product
  __m256i q;      // (lanes 0-3 sum values 0-15, lanes 4-7 values 16-31), the min
  __m256 scale;
  float min;
};

inline __m256i nibbles_of(__m128i raw) {  // 16 bytes -> 32 codes: the low nibbles, then the high ones
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i bits_to_16s(const uint8_t* qh_bytes) {  // 32 bits -> byte j = 16 where bit j is set, else 0
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  // byte j of the broadcast gets qh's byte j / 8, then keeps bit j % 8
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(qh)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

template <class F>
inline void decode_simd(const uint8_t* b, SimdSub* s);

template <>
inline void decode_simd<Q4_0>(const uint8_t* b, SimdSub* s) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  *s = {_mm256_sub_epi8(nibbles_of(raw), _mm256_set1_epi8(8)), _mm256_set1_ps(half_at(b)), 0.f};
}

template <>
inline void decode_simd<Q4_1>(const uint8_t* b, SimdSub* s) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  *s = {nibbles_of(raw), _mm256_set1_ps(half_at(b)), half_at(b + 2)};
}

template <>
inline void decode_simd<Q8_0>(const uint8_t* b, SimdSub* s) {
  *s = {load32(b + 2), _mm256_set1_ps(half_at(b)), 0.f};
}

template <>
inline void decode_simd<Q5_0>(const uint8_t* b, SimdSub* s) {
  const __m256i q = _mm256_or_si256(nibbles_of(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6))),
                                    bits_to_16s(b + 2));
  *s = {_mm256_sub_epi8(q, _mm256_set1_epi8(16)), _mm256_set1_ps(half_at(b)), 0.f};
}

template <>
inline void decode_simd<Q5_1>(const uint8_t* b, SimdSub* s) {
  const __m256i q = _mm256_or_si256(nibbles_of(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8))),
                                    bits_to_16s(b + 4));
  *s = {q, _mm256_set1_ps(half_at(b)), half_at(b + 2)};
}

template <bool kFiveBit>
inline void decode_k_simd(const uint8_t* b, SimdSub* s) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m256i qh = kFiveBit ? load32(b + 16) : _mm256_setzero_si256();
  const uint8_t* qs = b + (kFiveBit ? 48 : 16);
  for (int pair = 0; pair < 4; ++pair) {
    const __m256i bytes = load32(qs + 32 * pair);
    __m256i q[2] = {_mm256_and_si256(bytes, low_mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask)};
    for (int h = 0; h < 2; ++h) {
      const int sub = 2 * pair + h;
      if (kFiveBit) {  // bit `sub` of each qh byte, moved to 16
        const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << sub));
        q[h] = _mm256_or_si256(q[h], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                      _mm256_set1_epi8(16)));
      }
      int scale, min;
      k_scale_min(b + 4, sub, &scale, &min);
      s[sub] = {q[h], _mm256_set1_ps(d * scale), -(dmin * min)};
    }
  }
}

template <>
inline void decode_simd<Q4_K>(const uint8_t* b, SimdSub* s) { decode_k_simd<false>(b, s); }

template <>
inline void decode_simd<Q5_K>(const uint8_t* b, SimdSub* s) { decode_k_simd<true>(b, s); }

template <>
inline void decode_simd<Q6_K>(const uint8_t* b, SimdSub* s) {
  const float d = half_at(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const __m256i low_mask = _mm256_set1_epi8(0x0F), high_mask = _mm256_set1_epi8(0x30);
  for (int half = 0; half < 2; ++half) {
    const __m256i ql0 = load32(b + 64 * half), ql1 = load32(b + 64 * half + 32);
    const __m256i qh = load32(b + 128 + 32 * half);
    const __m256i low[4] = {_mm256_and_si256(ql0, low_mask), _mm256_and_si256(ql1, low_mask),
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low_mask),
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low_mask)};
    // bits 2t, 2t + 1 of qh moved to bits 4, 5: shifted left by 4 (t = 0), 2, 0, or right by 2
    const __m256i high[4] = {_mm256_and_si256(_mm256_slli_epi16(qh, 4), high_mask),
                             _mm256_and_si256(_mm256_slli_epi16(qh, 2), high_mask), _mm256_and_si256(qh, high_mask),
                             _mm256_and_si256(_mm256_srli_epi16(qh, 2), high_mask)};
    for (int t = 0; t < 4; ++t) {
      const float low_scale = d * sc[8 * half + 2 * t], high_scale = d * sc[8 * half + 2 * t + 1];
      s[4 * half + t] = {_mm256_sub_epi8(_mm256_or_si256(low[t], high[t]), _mm256_set1_epi8(32)),
                         _mm256_setr_ps(low_scale, low_scale, low_scale, low_scale, high_scale, high_scale,
                                        high_scale, high_scale),
                         0.f};
    }
  }
}
#endif

}  // namespace llmkit
