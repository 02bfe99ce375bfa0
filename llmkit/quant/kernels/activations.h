// Rows of x quantized to int8 per block of 32, as llama.cpp quantizes activations for its integer dot products (its
// Q8_0: dx = fp16(max|x| / 127), qx = round-half-even(x / dx)); shared by gguf_cpu.cpp and gguf_x8.cpp.

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gguf_formats.h"

namespace llmkit {

struct Activations {  // per row and block of 32: int8 codes, the scale dx, sum(qx) and dx sum(qx) (the min terms)
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> sums;
  std::vector<float> scaled_sums;
};

inline Activations quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t blocks = k / kSub;
  Activations a{std::vector<int8_t>(rows * k), std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks),
                std::vector<float>(rows * blocks)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * kSub;
      float amax = 0.f;
      for (int j = 0; j < kSub; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float inverse = d != 0.f ? 1.f / d : 0.f;
      int8_t* q = a.codes.data() + r * k + b * kSub;
      int32_t sum = 0;
      for (int j = 0; j < kSub; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inverse));
        sum += q[j];
      }
      const float dx = static_cast<float>(c10::Half(d));  // rounded to fp16, as llama.cpp's Q8_0 blocks store it
      a.scales[r * blocks + b] = dx;
      a.sums[r * blocks + b] = sum;
      a.scaled_sums[r * blocks + b] = dx * sum;
    }
  }
  return a;
}

}  // namespace llmkit
