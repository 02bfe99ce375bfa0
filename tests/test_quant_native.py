"""llmkit's GGUF block kernels (llmkit/quant/native.py, kernels/gguf_cpu.cpp) against the same math written out in
PyTorch: activations quantized per block of 32 as llama.cpp's Q8_0 (fp16 scale, round half to even), integer block
dot products scaled by d dx (+ m dx sum qx for Q4_1); and the layer that uses them against F.linear of the
dequantized weight within the error of int8 activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit.quant import QuantLinear, native
from llmkit.quant.formats import get_format
from llmkit.quant.gguf_blocks import block_fields

pytestmark = pytest.mark.skipif(not native.native_kernels_available(),
                                reason="the GGUF CPU kernels did not build here (no C++ compiler)")

SCHEMES = ["q4_0", "q4_1", "q8_0"]


def reference(x: torch.Tensor, packed) -> torch.Tensor:  # noqa: ANN001 (a QuantizedWeight)
    """y (rows, out) of the kernel's math in float64 from the same integers and fp16-rounded scales."""
    rows, width = x.shape
    blocks = x.view(rows, width // 32, 32)
    dx = (blocks.abs().amax(-1) / 127).half().double()  # (rows, nb) as llama.cpp stores it
    inverse = torch.where(dx > 0, 1 / (blocks.abs().amax(-1).double() / 127), torch.zeros_like(dx))
    qx = torch.round(blocks.double() * inverse[..., None])  # round half to even, as the kernel's nearbyint
    d, q, m = block_fields(packed)  # (out, nb), (out, nb, 32), (out, nb) or None
    q = q.double() - (8 if packed.scheme == "q4_0" else 0)
    dots = torch.einsum("onj,rnj->ron", q, qx)  # (rows, out, nb) exact integer sums
    y = (dots * d.double()[None] * dx[:, None]).sum(-1)
    if m is not None:
        y = y + (m.double()[None] * (dx * qx.sum(-1))[:, None]).sum(-1)
    return y


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])  # every row group size the kernel unrolls
def test_kernel_equals_the_written_out_block_math(scheme, rows):
    torch.manual_seed(rows)
    weight = torch.randn(96, 512)
    packed = get_format(scheme).quantize(weight, None)
    x = torch.randn(rows, 512) * torch.linspace(0.1, 4, 512)  # blocks of different scales
    x[0, :32] = 0  # an all-zero block: dx = 0
    y = native.gguf_matmul(x, packed.tensors["blocks"], scheme, 96)
    expected = reference(x, packed)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    # the same integers and scales; the kernel sums in float32 (vector lanes, then across blocks)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layer_takes_the_kernel_and_stays_within_int8_activation_error(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True)
    layer = QuantLinear.from_linear(linear, scheme)
    assert layer.kernel == "gguf"
    # it holds the file's blocks and nothing else: RAM = the GGUF bytes
    assert {name for name, _ in layer.named_buffers()} == {"weight_blocks"}
    x = torch.randn(3, 256)
    w_hat = layer.dequantized_weight()
    with torch.no_grad():
        y = layer(x)
    exact = F.linear(x.double(), w_hat.double(), linear.bias.double())
    # |x - dx qx| <= dx / 2 per value, dx = max|x_block| / 127 (x 1 + 2^-10 for its fp16 rounding)
    amax = x.view(3, 8, 32).abs().amax(-1).double()  # (rows, blocks)
    w_l1 = w_hat.view(128, 8, 32).abs().sum(-1).double()  # (out, blocks)
    bound = (amax / 254 * (1 + 2**-10)) @ w_l1.T + 1e-5
    assert bool(((y.double() - exact).abs() <= bound).all())


def test_fallback_without_the_kernels_is_the_int4_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "native_kernels_available", lambda: False)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 128), "q4_0")
    assert layer.kernel == "int4pack"


def test_kernel_refuses_more_rows_than_it_unrolls():
    packed = get_format("q8_0").quantize(torch.randn(64, 64), None)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        native.gguf_matmul(torch.randn(17, 64), packed.tensors["blocks"], "q8_0", 64)
