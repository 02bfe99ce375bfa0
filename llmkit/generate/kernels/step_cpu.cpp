// A decoder's one-token step through all its blocks as one call (llmkit/generate/native_step.py): the loop over the
// layers that the eager PyTorch step runs in Python, here in C++.
//
// Per block (pre-norm; Gemma 2/3's sandwich norms and QK-norm where given):
//
//   h = rms_norm(x, attn_norm)                       llmkit_nn::rms_norm
//   [q | k | v] = h [W_q; W_k; W_v]^T (+ b)          one product (fused) or three, each on its kernel (below)
//   q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)  QK-norm, per head over head_dim
//   a = attention(q, k, v, cache, slot)              llmkit_nn::decode_attention (RoPE inside, cache written)
//   x = x + post_attn_norm(a W_o^T (+ b))
//   h = rms_norm(x, mlp_norm)
//   [g | u] = h [W_gate; W_up]^T                     one product (fused) or two
//   x = x + post_mlp_norm((act(g) * u) W_down^T)     act: SiLU (SwiGLU) or GELU (GeGLU)
//
// Every piece is the op the eager step calls for it (llmkit's ops through the dispatcher, looked up by name once;
// aten's silu, gelu, mul and add through ATen), in the same order on the same tensors: the step's numbers are the
// eager step's, bit for bit (tests/test_generate_native_step.py). What it removes is the Python between them: module
// calls, views, fused-product checks, ~30 us per block on the 2-core CPU.
//
// A product is one of llmkit's decode kernels (`Kernel`): the float slab product over a column-major float32/f16/bf16
// matrix (llmkit_nn::linear), or the GGUF block kernels (llmkit_gguf::matmul, ::matmul_x8, ::matmul_float; their
// ops are built by llmkit/quant/native.py and looked up only when a product needs them).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "llmkit_ops.h"  // llmkit/kernels: the op namespace

#include <array>
#include <optional>
#include <vector>

namespace {

enum Kernel : int64_t { kLinear = 0, kGgufRows = 1, kGgufX8 = 2, kGgufFloat = 3 };
enum Role : int64_t { kQkv = 0, kOut = 1, kGateUp = 2, kDown = 3 };
enum Activation : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

using Optional = c10::optional<at::Tensor>;
using NormOp = at::Tensor(const at::Tensor&, const at::Tensor&, double, double);
using AttentionOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                               int64_t, const Optional&, int64_t, double, const Optional&, const Optional&);
using LinearOp = at::Tensor(const at::Tensor&, const at::Tensor&, const Optional&);
using BlocksOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using FloatOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);

template <typename F>
c10::TypedOperatorHandle<F> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

struct Product {
  int64_t kernel;  // Kernel
  at::Tensor weight;  // kLinear: W^T (in, out), unit stride along out; the GGUF kernels: their block bytes (uint8)
  Optional bias;  // (out,) float32
  int64_t kind;  // the GGUF kernels' format code (quant/native.py's INT8_KINDS)
  int64_t out_features;
};

struct Layer {
  at::Tensor attn_norm, mlp_norm;
  Optional post_attn_norm, post_mlp_norm, q_norm, k_norm;
  std::array<std::vector<Product>, 4> products;  // by Role: each role's parts, outputs side by side
  int64_t window;  // > 0: a sliding-window layer's window
  bool local;  // takes the local rotary tables (Gemma 3's sliding-window layers)
};

class DecodeProgram : public torch::CustomClassHolder {
 public:
  DecodeProgram(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t d_ff, double eps, double offset,
                double scale, int64_t activation)
      : H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), F_(d_ff), eps_(eps), offset_(offset), scale_(scale),
        activation_(activation), norm_(find_op<NormOp>("llmkit_nn::rms_norm")),
        attention_(find_op<AttentionOp>("llmkit_nn::decode_attention")),
        linear_(find_op<LinearOp>("llmkit_nn::linear")) {
    TORCH_CHECK(H_ > 0 && Hkv_ > 0 && H_ % Hkv_ == 0 && D_ > 0 && F_ > 0, "DecodeProgram: impossible head layout");
    TORCH_CHECK(activation >= kSilu && activation <= kGelu, "DecodeProgram: activation ", activation, " unknown");
  }

  void add_layer(at::Tensor attn_norm, at::Tensor mlp_norm, Optional post_attn_norm, Optional post_mlp_norm,
                 Optional q_norm, Optional k_norm, int64_t window, bool local) {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecodeProgram: QK-norm needs both norms");
    layers_.push_back(Layer{std::move(attn_norm), std::move(mlp_norm), std::move(post_attn_norm),
                            std::move(post_mlp_norm), std::move(q_norm), std::move(k_norm), {}, window, local});
  }

  void add_product(int64_t role, int64_t kernel, at::Tensor weight, Optional bias, int64_t kind,
                   int64_t out_features) {
    TORCH_CHECK(!layers_.empty(), "DecodeProgram: add_layer before its products");
    TORCH_CHECK(role >= kQkv && role <= kDown && kernel >= kLinear && kernel <= kGgufFloat,
                "DecodeProgram: role ", role, " or kernel ", kernel, " unknown");
    if (kernel == kGgufRows && !rows_) rows_ = find_op<BlocksOp>("llmkit_gguf::matmul");
    if (kernel == kGgufX8 && !x8_) x8_ = find_op<BlocksOp>("llmkit_gguf::matmul_x8");
    if (kernel == kGgufFloat && !float_) float_ = find_op<FloatOp>("llmkit_gguf::matmul_float");
    layers_.back().products[role].push_back(Product{kernel, std::move(weight), std::move(bias), kind, out_features});
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (B, 1, C) float32, the embedded tokens -> the last block's output (B, 1, C). k_caches / v_caches: each layer's
  // (B, Hkv, S, D) cache, `slot` the new token's, `valid` (B, S) the padding mask (None: no padding); cos / sin the
  // rotary tables of the new positions (B or 1, 1, 1, R), local_cos / local_sin those of sliding-window layers.
  at::Tensor step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t slot,
                  Optional valid, Optional cos, Optional sin, Optional local_cos, Optional local_sin) {
    const int64_t L = n_layers();
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L,
                "DecodeProgram.step: ", L, " layers but ", k_caches.size(), " key caches and ", v_caches.size(),
                " value caches");
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "DecodeProgram.step: x must be (B, 1, C), one token per row");
    const int64_t B = x.size(0);
    for (int64_t l = 0; l < L; ++l) {
      const Layer& layer = layers_[l];
      // attention: h -> [q | k | v] (B, 1, (H + 2 Hkv) D) -> heads (B, H + 2 Hkv, 1, D), views
      at::Tensor h = norm_.call(x, layer.attn_norm, eps_, offset_);
      at::Tensor qkv = run(layer.products[kQkv], h).view({B, 1, H_ + 2 * Hkv_, D_}).transpose(1, 2);
      at::Tensor q = qkv.narrow(1, 0, H_), k = qkv.narrow(1, H_, Hkv_), v = qkv.narrow(1, H_ + Hkv_, Hkv_);
      if (layer.q_norm.has_value()) {
        q = norm_.call(q, *layer.q_norm, eps_, offset_);
        k = norm_.call(k, *layer.k_norm, eps_, offset_);
      }
      const Optional& c = layer.local ? local_cos : cos;
      const Optional& s = layer.local ? local_sin : sin;
      at::Tensor a = attention_.call(q, k, v, k_caches[l], v_caches[l], slot, valid, layer.window, scale_, c, s);
      a = run(layer.products[kOut], a);  // (B, 1, C)
      if (layer.post_attn_norm.has_value()) a = norm_.call(a, *layer.post_attn_norm, eps_, offset_);
      x = at::add(x, a);
      // feed-forward: [g | u] (B, 1, 2 F) -> act(g) * u (B, 1, F) -> (B, 1, C)
      h = norm_.call(x, layer.mlp_norm, eps_, offset_);
      at::Tensor gate_up = run(layer.products[kGateUp], h);
      at::Tensor gate = gate_up.narrow(-1, 0, F_), up = gate_up.narrow(-1, F_, F_);
      at::Tensor act = activation_ == kSilu ? at::silu(gate) : at::gelu(gate, activation_ == kGeluTanh ? "tanh" : "none");
      at::Tensor m = run(layer.products[kDown], at::mul(act, up));
      if (layer.post_mlp_norm.has_value()) m = norm_.call(m, *layer.post_mlp_norm, eps_, offset_);
      x = at::add(x, m);
    }
    return x;
  }

 private:
  at::Tensor product(const Product& p, const at::Tensor& x) const {
    at::Tensor y;
    switch (p.kernel) {
      case kLinear: return linear_.call(x, p.weight, p.bias);  // adds the bias itself
      case kGgufRows: y = rows_->call(x, p.weight, p.kind, p.out_features); break;
      case kGgufX8: y = x8_->call(x, p.weight, p.kind, p.out_features); break;
      default: y = float_->call(x, p.weight, p.out_features); break;
    }
    return p.bias.has_value() ? at::add(y, *p.bias) : y;
  }

  // the role's parts on x, their outputs side by side (one part: its output as it is)
  at::Tensor run(const std::vector<Product>& parts, const at::Tensor& x) const {
    TORCH_CHECK(!parts.empty(), "DecodeProgram: a layer is missing a product");
    if (parts.size() == 1) return product(parts[0], x);
    std::vector<at::Tensor> outputs;
    for (const Product& p : parts) outputs.push_back(product(p, x));
    return at::cat(outputs, -1);
  }

  int64_t H_, Hkv_, D_, F_;
  double eps_, offset_, scale_;
  int64_t activation_;
  c10::TypedOperatorHandle<NormOp> norm_;
  c10::TypedOperatorHandle<AttentionOp> attention_;
  c10::TypedOperatorHandle<LinearOp> linear_;
  std::optional<c10::TypedOperatorHandle<BlocksOp>> rows_, x8_;
  std::optional<c10::TypedOperatorHandle<FloatOp>> float_;
  std::vector<Layer> layers_;
};

}  // namespace

LLMKIT_LIBRARY(LLMKIT_OPS, m) {
  m.class_<DecodeProgram>("DecodeProgram")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, double, int64_t>())
      .def("add_layer", &DecodeProgram::add_layer)
      .def("add_product", &DecodeProgram::add_product)
      .def("step", &DecodeProgram::step);
}
