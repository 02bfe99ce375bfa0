"""llmkit's GGUF kernels (llmkit/quant/native.py, kernels/) against the same math written out in PyTorch: activations
quantized per block of 32 as llama.cpp's Q8_0 (fp16 scale, round half to even), each block's products summed with the
weights of the format's own dequantizer (bit-exact with gguf.quants, tests/test_quant_gguf_load.py); the float-
activation kernel against F.linear of the dequantized weight; the layers that use them against F.linear within the
error of int8 activations; and the AVX2 and plain C++ builds against the native one (the CI machine may lack the
instructions this one has)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmkit.nn import decode_kernels
from llmkit.quant import QuantLinear, native
from llmkit.quant.formats import get_format
from tests.helpers import int8_activation_bound

pytestmark = pytest.mark.skipif(not native.native_kernels_available(),
                                reason="the GGUF CPU kernels did not build here (no C++ compiler)")

INT8_SCHEMES = list(native.INT8_KINDS)  # q4_0 q4_1 q8_0 q5_0 q5_1 q4_k q5_k q6_k

def reference(x: torch.Tensor, packed) -> torch.Tensor:  # noqa: ANN001 (a QuantizedWeight)
    """y (rows, out) of the kernel's math in float64: x rounded per block of 32 exactly as the kernel rounds it (fp32
    scale and reciprocal, round half to even, dx stored as fp16), times the dequantizer's weights."""
    rows, width = x.shape
    blocks = x.view(rows, width // 32, 32)
    d = blocks.abs().amax(-1) / 127  # (rows, nb) fp32
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    qx = torch.round(blocks * inverse[..., None]).double()
    w_hat = get_format(packed.scheme).dequantize(packed, torch.float64).view(packed.shape[0], width // 32, 32)
    return torch.einsum("onj,rnj,rn->ro", w_hat, qx, d.half().double())


def random_weight(scheme: str, out_features: int = 96, in_features: int = 512) -> torch.Tensor:
    return torch.randn(out_features, in_features) * torch.linspace(0.2, 3, in_features)  # blocks of different scales


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])  # every row group size the kernel unrolls
def test_kernel_equals_the_written_out_block_math(scheme, rows):
    torch.manual_seed(rows)
    packed = get_format(scheme).quantize(random_weight(scheme), None)
    x = torch.randn(rows, 512) * torch.linspace(0.1, 4, 512)
    x[0, :32] = 0  # an all-zero block: dx = 0
    y = native.gguf_matmul(x, packed.tensors["blocks"], scheme, 96)
    expected = reference(x, packed)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    # the same integers and scales; the kernel sums in float32 (vector lanes, then across blocks)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("scheme", native.X8_SCHEMES)
@pytest.mark.parametrize("out_features", [96, 83])  # 83: a last group of 3 rows and 5 zero rows
def test_eight_row_layout_is_a_lossless_reordering(scheme, out_features):
    torch.manual_seed(out_features)
    blocks = get_format(scheme).quantize(random_weight(scheme, out_features, 256), None).tensors["blocks"]
    regrouped = native.to_x8(blocks, scheme)
    assert regrouped.shape == (-(-out_features // 8), blocks.shape[1] * 8)
    assert torch.equal(native.from_x8(regrouped, scheme, out_features), blocks)


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_dequantize_equals_gguf_bit_for_bit(scheme):
    torch.manual_seed(3)
    packed = get_format(scheme).quantize(random_weight(scheme, 83, 512), None)  # 83: a last group of 3 rows
    blocks = packed.tensors["blocks"]
    expected = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[scheme.upper()]))
    values = native.dequantize(blocks, scheme, 83)
    assert values.dtype == torch.float32 and values.shape == (83, 512)
    assert torch.equal(values, expected.view(83, 512))
    assert torch.equal(values, get_format(scheme).dequantize(packed))
    if scheme in native.X8_SCHEMES:
        assert torch.equal(native.dequantize_x8(native.to_x8(blocks, scheme), scheme, 83), values)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", "q6_k"])  # the 8-row layout (two) and the file's blocks
def test_many_rows_and_lookups_use_the_exact_dequantized_weight(scheme):
    torch.manual_seed(4)
    layer = QuantLinear(get_format(scheme).quantize(random_weight(scheme, 96, 512), None), torch.randn(96))
    assert ("weight_x8" in layer._buffers) == (scheme in native.X8_SCHEMES)
    weight = get_format(scheme).dequantize(layer.packed)  # torch's dequantizer on the file's bytes
    x = torch.randn(2, 20, 512)  # 40 rows: more than the kernels take, so one F.linear with the widened matrix
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias))
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), weight.bfloat16())
    rows = torch.tensor([0, 95, 7, 8, 40, 40])
    assert torch.equal(layer.dequantized_rows(rows), weight[rows])


@pytest.mark.parametrize("scheme", native.X8_SCHEMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_eight_row_kernel_equals_the_written_out_block_math(scheme, rows):
    torch.manual_seed(rows)
    packed = get_format(scheme).quantize(random_weight(scheme, 83), None)
    x = torch.randn(rows, 512) * torch.linspace(0.1, 4, 512)
    x[0, :32] = 0
    y = native.x8_matmul(x, native.to_x8(packed.tensors["blocks"], scheme), scheme, 83)
    expected = reference(x, packed)
    assert y.shape == (rows, 83)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1"])
@pytest.mark.parametrize("code", [0x00, 0xFF])
def test_eight_row_kernel_holds_the_largest_4_bit_sums(scheme, code):
    # every code 0 or 15 and every activation code +-127: the largest integer sums per block (AVX2 adds the 8 chunks'
    # pair sums in int16 before widening: 8 x 2 x 15 x 127 = 30,480 must not wrap)
    packed = get_format(scheme).quantize(random_weight(scheme, 16, 256), None)
    blocks = packed.tensors["blocks"].clone().view(16, -1, 18 if scheme == "q4_0" else 20)
    blocks[..., -16:] = code
    packed.tensors["blocks"] = blocks.view(16, -1)
    x = torch.ones(2, 256)
    x[1, ::2] = -1
    y = native.x8_matmul(x, native.to_x8(packed.tensors["blocks"], scheme), scheme, 16)
    expected = reference(x, packed)
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 3, 16])
def test_float_kernel_equals_f_linear_of_the_dequantized_weight(rows):
    torch.manual_seed(rows)
    packed = get_format("q8_0").quantize(random_weight("q8_0", 80, 512), None)
    x = torch.randn(rows, 512)
    y = native.float_matmul(x, packed.tensors["blocks"], 80)
    expected = F.linear(x.double(), get_format("q8_0").dequantize(packed, torch.float64))
    # float32 products of the exact weights: only the summation order differs from F.linear
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_layer_takes_the_kernel_and_stays_within_int8_activation_error(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 128, bias=True)
    layer = QuantLinear.from_linear(linear, scheme) if scheme in ("q4_0", "q4_1", "q8_0") else QuantLinear(
        get_format(scheme).quantize(linear.weight, None), linear.bias)
    assert layer.kernel == "gguf"
    # it holds the file's blocks (q4_0, q4_1, q8_0: regrouped 8 rows at a time) and nothing else: RAM = the GGUF bytes
    (name, buffer), = layer.named_buffers()
    assert name == ("weight_x8" if scheme in native.X8_SCHEMES else "weight_blocks")
    assert buffer.numel() == get_format(scheme).quantize(linear.weight, None).nbytes
    x = torch.randn(3, 512)
    w_hat = layer.dequantized_weight()
    with torch.no_grad():
        y = layer(x)
    exact = F.linear(x.double(), w_hat.double(), linear.bias.double())
    assert bool(((y.double() - exact).abs() <= int8_activation_bound(x, w_hat) + 1e-5).all())


# 200: a half-precision width that is not a multiple of 32 (Q8_0's blocks need one)
@pytest.mark.parametrize(("scheme", "in_features"), [("q8_0", 256), ("f16", 256), ("f16", 200), ("bf16", 256),
                                                      ("bf16", 200)])
def test_head_and_half_layers_take_the_float_kernel(scheme, in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 64, bias=True)
    packed = get_format(scheme).quantize(linear.weight, None)
    layer = QuantLinear(packed, linear.bias, int8_activations=scheme in ("f16", "bf16"))  # a Q8_0 head: float x
    assert layer.kernel == "gguf_float"
    if scheme != "q8_0":  # kept column-major for the decode linear op, handed back as the same values
        assert layer.weight_weight.t().is_contiguous()
        assert torch.equal(layer.packed.tensors["weight"], packed.tensors["weight"])
    for rows in (1, 3):
        x = torch.randn(rows, 1, in_features)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (rows, 1, 64)
        expected = F.linear(x.double(), get_format(scheme).dequantize(packed, torch.float64), linear.bias.double())
        assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_q6_k_head_takes_int8_activations_rather_than_dequantizing_per_call():
    packed = get_format("q6_k").quantize(torch.randn(64, 256), None)
    assert QuantLinear(packed, int8_activations=False).kernel == "gguf"


def test_fallback_without_the_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "native_kernels_available", lambda: False)
    monkeypatch.setattr(decode_kernels, "available", lambda: False)
    assert QuantLinear.from_linear(torch.nn.Linear(256, 128), "q4_0").kernel == "int4pack"
    assert QuantLinear(get_format("q6_k").quantize(torch.randn(64, 256), None)).kernel == "dequantize"
    assert QuantLinear(get_format("f16").quantize(torch.randn(64, 256), None)).kernel == "half"


def test_kernels_refuse_more_rows_than_they_unroll_and_mismatched_bytes():
    packed = get_format("q8_0").quantize(torch.randn(64, 64), None)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        native.gguf_matmul(torch.randn(17, 64), packed.tensors["blocks"], "q8_0", 64)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        native.float_matmul(torch.randn(17, 64), packed.tensors["blocks"], 64)
    with pytest.raises(RuntimeError, match="expected"):  # blocks of another format than the kind says
        native.gguf_matmul(torch.randn(1, 64), packed.tensors["blocks"], "q4_0", 64)
    with pytest.raises(RuntimeError, match="expected"):
        native.x8_matmul(torch.randn(1, 64), native.to_x8(packed.tensors["blocks"], "q8_0"), "q4_1", 64)
    with pytest.raises(RuntimeError, match="not a whole number of 18-byte blocks"):  # 68 bytes per row
        native.dequantize(packed.tensors["blocks"], "q4_0", 64)
    with pytest.raises(RuntimeError, match="do not hold 65 rows"):
        native.dequantize_x8(native.to_x8(packed.tensors["blocks"], "q8_0"), "q8_0", 65)
    ops = getattr(torch.ops, native.OPS)  # a kind outside native.INT8_KINDS (or outside the 8-row layout's three)
    with pytest.raises(RuntimeError, match="gguf_matmul: unknown kind 8"):
        ops.matmul(torch.randn(1, 64), packed.tensors["blocks"], 8, 64)
    with pytest.raises(RuntimeError, match="dequantize: unknown kind -1"):
        ops.dequantize(packed.tensors["blocks"], -1, 64)
    with pytest.raises(RuntimeError, match=r"matmul_x8: unknown kind 3 for the 8-row layout"):  # q5_0
        ops.matmul_x8(torch.randn(1, 64), native.to_x8(packed.tensors["blocks"], "q8_0"), 3, 64)
    with pytest.raises(RuntimeError, match=r"dequantize_x8: unknown kind 7 for the 8-row layout"):  # q6_k
        ops.dequantize_x8(native.to_x8(packed.tensors["blocks"], "q8_0"), 7, 64)


VARIANTS = {"llmkit_gguf_avx2": ["-O1", "-march=haswell"], "llmkit_gguf_plain": ["-O1", "-march=x86-64"]}


@pytest.fixture(scope="module")
def variant_builds() -> dict[str, list[str]]:
    for ops, flags in VARIANTS.items():
        native.build(flags, ops)
    return VARIANTS


@pytest.mark.slow
def test_avx2_and_plain_builds_equal_the_native_one(variant_builds):
    # this machine has AVX512-VNNI; a CI machine without it runs the AVX2 path, one without AVX2 the plain C++
    torch.manual_seed(0)
    def float_matmul(x, blocks, scheme, out_features, ops=native.OPS):  # noqa: ANN001, ANN202 (the others' signature)
        return native.float_matmul(x, blocks, out_features, ops=ops)

    runs = ([(native.gguf_matmul, s) for s in INT8_SCHEMES] + [(float_matmul, "q8_0")]
            + [(native.x8_matmul, s) for s in native.X8_SCHEMES])
    for run, scheme in runs:
        packed = get_format(scheme).quantize(random_weight(scheme, 83, 512), None)
        weight = packed.tensors["blocks"]
        weight = native.to_x8(weight, scheme) if run is native.x8_matmul else weight
        x = torch.randn(5, 512)
        y = run(x, weight, scheme, 83)
        for ops in variant_builds:
            z = run(x, weight, scheme, 83, ops=ops)
            assert torch.allclose(z, y, rtol=1e-5, atol=1e-5 * y.abs().max().item()), (ops, run.__name__, scheme)
    for scheme in INT8_SCHEMES:  # widening is exact in every build
        blocks = get_format(scheme).quantize(random_weight(scheme, 83, 512), None).tensors["blocks"]
        values = native.dequantize(blocks, scheme, 83)
        for ops in variant_builds:
            assert torch.equal(native.dequantize(blocks, scheme, 83, ops=ops), values), (ops, scheme)
            if scheme in native.X8_SCHEMES:
                regrouped = native.to_x8(blocks, scheme)
                assert torch.equal(native.dequantize_x8(regrouped, scheme, 83, ops=ops), values), (ops, scheme)
