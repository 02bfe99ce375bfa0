// What every llmkit C++ op file shares (built by llmkit/extensions.py, which puts this folder on the include path):
// the torch op namespace its ops register under, and the shapes of a decode step's products.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

// The namespace comes from the build (-DLLMKIT_OPS=llmkit_gguf, llmkit_nn, or a test's variant build under another
// name); the indirection expands it before TORCH_LIBRARY pastes it.
#ifndef LLMKIT_OPS
#error "build with -DLLMKIT_OPS=<namespace> (llmkit/extensions.py's build_ops passes it)"
#endif
#define LLMKIT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LLMKIT_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

namespace llmkit {

// x (..., k) float32 as the contiguous matrix of its rows (rows, k), at most `max_rows` of them: the ops take x of
// any rank, as F.linear does, and return (..., out_features) (`rows_shape`), so a caller reshapes nothing
inline at::Tensor as_rows(const at::Tensor& x, int64_t max_rows, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, op, ": x must be a float32 tensor (..., in)");
  const at::Tensor rows = x.contiguous().view({-1, x.size(-1)});
  TORCH_CHECK(rows.size(0) <= max_rows, op, ": at most ", max_rows, " rows per call");
  return rows;
}

inline std::vector<int64_t> rows_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

}  // namespace llmkit
