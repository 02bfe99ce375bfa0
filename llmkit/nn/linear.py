"""`nn.Linear` with a faster one-token path on CPUs (the decode step of generation).

Decoding one token multiplies a single row x by every weight matrix, so its speed is how fast the
weights stream from memory. On CPUs, BLAS runs such a matrix-vector product on one thread. When the
weight is stored column-major (see `use_column_major_weights`), its transpose (in, out) splits into
S contiguous slabs along the input axis, and

    y = x W^T = sum_s x[s-th input slice] @ W^T[s-th slab]

is one batched matmul over S slabs that the threads share, then a sum over s. Same numbers up to
summation order; prefill and training (many rows) use the ordinary `F.linear`. float32 only: the
CPU bf16/fp16 matrix-vector kernels are no faster split (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed as a thread-parallel sum of slab products for a single row on CPU."""
    out_features, in_features = weight.shape
    n_slabs = torch.get_num_threads()
    if (
        x.numel() != in_features
        or x.device.type != "cpu"
        or weight.dtype != torch.float32  # CPU bf16/fp16 matrix-vector kernels gain nothing from slabs
        or n_slabs < 2
        or in_features % n_slabs
        or weight.stride() != (1, out_features)  # column-major: weight.t() is contiguous (in, out)
        or torch.is_grad_enabled()
    ):
        return F.linear(x, weight, bias)
    slabs = weight.t().view(n_slabs, in_features // n_slabs, out_features)  # (S, in/S, out), no copy
    y = torch.bmm(x.reshape(n_slabs, 1, in_features // n_slabs), slabs).sum(0)  # (1, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)


def use_column_major_weights(model: nn.Module) -> nn.Module:
    """Store every 2-D float32 weight of `model` column-major (same values and shapes, transposed memory
    layout), which `linear` turns into thread-parallel decode steps. In place; returns the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.is_contiguous() and parameter.dtype == torch.float32:
                parameter.data = parameter.data.t().contiguous().t()
    return model
