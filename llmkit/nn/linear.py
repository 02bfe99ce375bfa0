"""`nn.Linear` with a faster one-token path on CPUs (the decode step of generation).

Decoding one token multiplies a single row x by every weight matrix, so its speed is how fast the
weights stream from memory. On CPUs, BLAS runs such a matrix-vector product on one thread. When the
weight is stored column-major (see `use_column_major_weights`), its transpose (in, out) splits into
S contiguous slabs along the input axis, and

    y = x W^T = sum_s x[s-th input slice] @ W^T[s-th slab]

is one batched matmul over S slabs that the threads share, then a sum over s. Same numbers up to
summation order; prefill and training (many rows) use the ordinary `F.linear`. In a decode step (one new token per
row, `decode_kernels.applies`) llmkit's native op does the same split in one call, also inside torch.compile's
graph; the batched matmul is the path where the native ops are not built. float32 only: the
CPU bf16/fp16 matrix-vector kernels are no faster split (measured in docs/benchmarks.md).

bfloat16 one-row products take another path: `F.linear`'s bf16 matrix-vector kernel runs at ~6 GB/s on one thread
here, slower than float32's at twice the bytes, while oneDNN's linear on a weight reordered once into its blocked
layout (`llmkit.nn.fused.pack_bfloat16_weights`; what inductor's CPU freezing pass does) runs ~1.8x faster
(docs/benchmarks.md,
"Decode speed"). float16 gains nothing from it on the measured CPU and is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.nn import decode_kernels


class Linear(nn.Linear):
    packed: PackedWeight | None = None  # set by llmkit.nn.fused.pack_bfloat16_weights
    onednn_prompts = False  # set by use_onednn_for_prompts: many-row inference products on oneDNN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.onednn_prompts)

    def decode_product(self) -> decode_kernels.DecodeProduct | None:
        """The product a one-token forward runs on llmkit's slab op (`linear` below): a float32 column-major weight
        (what the loaders store); None for any other weight, or a subclass (its forward may do more)."""
        return float_product(self.weight, self.bias) if type(self) is Linear else None


class PackedWeight:
    """A bfloat16 weight (out, in) reordered by oneDNN for one-row products, valid while the tensors it was made
    from (`sources`: the weight itself, or the parameters a fused weight views) are unchanged: same storage, no
    in-place write since. A stale copy is never used."""

    def __init__(self, weight: torch.Tensor, sources: Sequence[torch.Tensor] | None = None) -> None:
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # opaque oneDNN layout, batch 1
        self.sources = list(sources) if sources is not None else [weight]
        self.state = self._state()

    def _state(self) -> list[tuple[int, int]]:
        return [(source.data_ptr(), source._version) for source in self.sources]

    def is_current(self) -> bool:
        return self._state() == self.state

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.tensor, bias, "none", [], "")

    def __reduce__(self) -> tuple:
        """Copies and pickles of a model hold None here (oneDNN's opaque tensor has no storage to copy): they run
        the unpacked product, the same numbers."""
        return type(None), ()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: PackedWeight | None = None,
    onednn_prompts: bool = False,
) -> torch.Tensor:
    """F.linear, computed as a thread-parallel sum of slab products for a single float32 row on CPU, or from the
    oneDNN-packed copy `packed` of a bfloat16 weight for a single row; with `onednn_prompts`, several float32 rows
    under inference mode on oneDNN's matrix product (`prompt_product`)."""
    out_features, in_features = weight.shape
    if (weight.dtype == torch.float32 and weight.stride() == (1, out_features)
            and x.numel() <= decode_kernels.MAX_ROWS * in_features and decode_kernels.applies(x)):
        return decode_kernels.linear(x, weight, bias)  # a decode step, eager or compiled: llmkit's slab kernel
    if torch.compiler.is_compiling():  # inductor plans its own product (and cannot trace get_num_threads)
        return F.linear(x, weight, bias)
    if packed is not None and x.numel() == in_features and not torch.is_grad_enabled() and packed.is_current():
        return packed(x, bias)
    if onednn_prompts and x.numel() > in_features and prompt_product_applies(x, weight):
        return prompt_product(x, weight, bias)
    if (
        x.numel() != in_features
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or weight.dtype != torch.float32  # CPU bf16/fp16 matrix-vector kernels gain nothing from slabs
        or weight.stride() != (1, out_features)  # column-major: weight.t() is contiguous (in, out)
    ):
        return F.linear(x, weight, bias)
    # asked only on the one-row path: torch.compile cannot trace get_num_threads (a graph break in every training
    # step's linear before this test came second)
    n_slabs = torch.get_num_threads()
    if n_slabs < 2 or in_features % n_slabs:
        return F.linear(x, weight, bias)
    slabs = weight.t().view(n_slabs, in_features // n_slabs, out_features)  # (S, in/S, out), no copy
    y = torch.bmm(x.reshape(n_slabs, 1, in_features // n_slabs), slabs).sum(0)  # (1, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)


def prompt_product_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `prompt_product` serves x W^T: float32 x and weight on the CPU under inference mode (generation's
    prefill, evaluation; never under no_grad alone, so a sequence scored with and without autograd, DPO's reference
    log-probabilities and PPO's first KL, runs F.linear both times), oneDNN built in."""
    return (torch.is_inference_mode_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())


def prompt_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) W^T (+ b) on oneDNN's float32 matrix product, the weight as it is (row- or column-major, no
    packed copy): a prompt's rows, or a speculative step's few. Same float32 arithmetic as F.linear's MKL GEMM up to
    the order of the sums (their errors against float64: ~1e-4 on sums of 576-1,536 unit products, ~2x MKL's), and
    on SmolLM2's matrices on the Zen 4 VM, where MKL takes its AVX2 code path, 1.1-1.6x its speed for 17-512 rows and
    1.7-4x for 2-12 (docs/quantization.md, "Prompts on oneDNN")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def float_product(weight: torch.Tensor, bias: torch.Tensor | None) -> decode_kernels.DecodeProduct | None:
    """What `linear` runs for one row of x on weight (out, in) where that is llmkit's slab op (float32, column-major
    as a whole: the condition `linear` tests); None where it takes another path."""
    if weight.dtype != torch.float32 or weight.stride() != (1, weight.shape[0]):
        return None
    return decode_kernels.column_major_product(weight, bias)


def use_column_major_weights(model: nn.Module) -> nn.Module:
    """Store every 2-D float32 weight of `model` column-major (same values and shapes, transposed memory
    layout), which `linear` turns into thread-parallel decode steps. In place; returns the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.is_contiguous() and parameter.dtype == torch.float32:
                parameter.data = parameter.data.t().contiguous().t()
    return model


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `PackedWeight` can pack this weight: a 2-D bfloat16 CPU tensor, with oneDNN built in and a CPU its
    bfloat16 path runs on (AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU oneDNN refuses to reorder)."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())

