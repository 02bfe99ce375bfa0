"""Native ops for a decoder's one-token step on the CPU (kernels/decode_cpu.cpp): RMSNorm, attention over the KV
cache, each one call, and the float32 matrix-vector product.

Eager PyTorch spends a decode step of a small model mostly in op dispatch: `F.rms_norm` in float32 runs as ~10 aten
ops on the CPU (pow, mean, add, rsqrt, mul, ...), and a cached attention layer as ~20 (slicing the cache to write the
new key and value, slicing it again to read, the dtype casts around a bfloat16 cache, SDPA, the transposes back).
At SmolLM2-135M's size, with 61 norms and 30 attention layers per token, that is ~1,100 of the step's ~1,500 ops.
Here each is one op:

- `rms_norm(x, weight, eps, offset)` = x / sqrt(mean(x^2) + eps) * (offset + weight), squares summed in double
  (as llama.cpp's ggml sums them).
- `linear(x, weight, bias)`: x W^T + b from a weight stored column-major (`nn.linear.use_column_major_weights`,
  what the loaders do), its rows split in one contiguous slab per thread, each streamed front to back into a partial
  product, the partials summed: 24-33 GB/s over SmolLM2's matrices with 2 threads where F.linear's GEMV reads 14-19
  (and torch.compile could not trace the slab split `nn.linear` does with torch ops). float16/bfloat16 weights
  (F16/BF16 GGUF layers, quant.QuantLinear) are widened as they stream: 20-37 GB/s where the row-major half kernel
  read 16-26.
- `decode_attention(...)`: rotates the token's query and key by RoPE (the ~10 small ops per layer of
  `nn.position.apply_rope` on q and k), stores its key and value in the cache (float32, bfloat16 or float16) and returns
  softmax(scale q K^T) V over the slots the query may see (left padding and a sliding window respected), grouped-
  query heads sharing one read of their key/value head, the slots split in chunks over the threads and the chunks'
  softmax statistics combined exactly (flash-decoding; the math in the C++ file).

All three are used only where they apply (`applies`): decode steps (one new token per row) with float32 activations on
the CPU, without autograd or autocast. `torch.compile` traces them as custom ops (fake tensors below). Where the
build fails (no C++ compiler) or LLMKIT_NATIVE_KERNELS=0, the callers keep their PyTorch path.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from llmkit.extensions import try_build_ops

SOURCE = Path(__file__).parent / "kernels" / "decode_cpu.cpp"
OPS = "llmkit_nn"


_built: bool | None = None  # None: not tried yet


def available() -> bool:
    """Whether the decode ops are built and loaded (building them on the first call). A module global rather than a
    functools.cache, so torch.compile reads it as a constant instead of tracing into the build."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if not try_build_ops(OPS, [SOURCE], what="decode kernels", fallback="norms and attention use PyTorch's ops"):
        return False

    @torch.library.register_fake(f"{OPS}::rms_norm")
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:  # torch.compile
        return torch.empty_like(x)

    @torch.library.register_fake(f"{OPS}::linear")
    def _(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight_t.shape[1])

    @torch.library.register_fake(f"{OPS}::decode_attention")
    def _(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          slot: int, valid: torch.Tensor | None, window: int, scale: float, cos: torch.Tensor | None,
          sin: torch.Tensor | None) -> torch.Tensor:
        return q.new_empty(q.shape[0], 1, q.shape[1] * q.shape[3])

    return True


def applies(x: torch.Tensor) -> bool:
    """Whether the decode ops serve activations `x`: one token per row (x (..., 1, C): a decode step), float32 on the
    CPU, no autograd and no autocast, the ops built.

    Only decode steps: a full-sequence forward keeps PyTorch's ops even at inference, so that the same sequence gives
    bit-identical numbers with and without autograd (DPO's cached reference log-probabilities, PPO's "KL exactly 0
    at step 0" rest on that). Under autocast the projections return bfloat16, which the ops do not take."""
    return (x.dim() >= 2 and x.shape[-2] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x (..., C) / sqrt(mean(x^2) + eps) * (offset + weight), float32 in and out (see `applies`)."""
    return torch.ops.llmkit_nn.rms_norm(x, weight, eps, offset)


MAX_ROWS = 16  # rows of x per `linear` call (the kernel's kLinearMaxRows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) W^T + b, float32, for a weight (out, in) in float32, float16 or bfloat16 stored column-major
    (weight.t() contiguous, or a block of columns of such a matrix), at most MAX_ROWS rows of x (see `applies`)."""
    return torch.ops.llmkit_nn.linear(x, weight.t(), bias)


class DecodeProduct(NamedTuple):
    """One matrix product of a decode step as a layer runs it on llmkit's kernels, for llmkit's whole-step op
    (llmkit/generate/native_step.py), which calls the same op on the same tensors without the layer's Python:
    y = op(x, weight, ...) (+ bias). Layers describe themselves (`Linear.decode_product`, QuantLinear's, and
    `llmkit.nn.fused.decode_products` for a fused group); None where a layer's one-token forward takes another
    path."""

    op: str  # the torch op's qualified name: "llmkit_nn::linear" or one of llmkit.quant.native's GGUF ops
    weight: torch.Tensor  # what the op takes: W^T (in, out) column-major for `linear`, the block bytes for GGUF ops
    bias: torch.Tensor | None  # (out,) float32, added to the op's output
    kind: int  # the GGUF ops' format code (0 for `linear`)
    out_features: int


def column_major_product(weight: torch.Tensor, bias: torch.Tensor | None) -> DecodeProduct | None:
    """The `linear` op's product for a weight (out, in) stored column-major in float32 (or float16/bfloat16: GGUF's
    F16/BF16 layers) on the CPU, with a float32 bias or none; None for any other weight."""
    out_features = weight.shape[0]
    if (weight.dim() != 2 or weight.device.type != "cpu" or out_features < 2 or weight.stride(0) != 1
            or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or (bias is not None and bias.dtype != torch.float32)):
        return None
    return DecodeProduct(f"{OPS}::linear", weight.t(), bias, 0, out_features)


def decode_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot: int, valid: torch.Tensor | None, window: int, scale: float, cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row: rotates q (B, H, 1, D) and k_new (B, Hkv, 1, D) by RoPE when `cos`, `sin` (B or 1,
    1, 1, R) are given (`nn.position.apply_rope`'s rotate-half layout, the first R channels), writes k_new, v_new into
    cache slot `slot` of k_cache, v_cache (B, Hkv, S, D) and returns attention of q over slots 0..slot as (B, 1,
    H * D) float32. `valid` (B, S) bool hides left-padding keys (None: all real); `window` > 0 limits a query to its
    last `window` slots."""
    return torch.ops.llmkit_nn.decode_attention(q, k_new, v_new, k_cache, v_cache, slot, valid, window, scale, cos,
                                                sin)
