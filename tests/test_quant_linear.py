"""QuantLinear against F.linear with the dequantized weight (1 row and many, fp32 and bf16 activations), the int4
tinygemm layout against aten's own packer, the affine block view of each format against its dequantizer, wide codes
split into two 4-bit pieces, the kernel each format takes, and that packed buffers stay packed."""

import pytest
import torch
import torch.nn.functional as F

from llmkit.quant import affine, native
from llmkit.quant.formats import FORMATS, get_format
from llmkit.quant.linear import QuantLinear, kernel_for
from llmkit.quant.tinygemm import codes_of, from_tinygemm, kernel_weight, to_tinygemm
from tests.helpers import int8_activation_bound

BUILT = native.native_kernels_available()  # llmkit's kernels where they build, else (no compiler) aten's or dequantize
NATIVE = "gguf" if BUILT else "int4pack"
KERNELS = {"int8": "int8pack", "int4": "int4pack", "int4_asym": "int4pack", "q4_0": NATIVE, "q4_1": NATIVE,
           "q8_0": NATIVE, "nf4": "dequantize", "q5_0": NATIVE, "q5_1": NATIVE, "q4_k": NATIVE,
           "q5_k": NATIVE, "q6_k": "gguf" if BUILT else "dequantize", "f16": "gguf_float" if BUILT else "half",
           "bf16": "gguf_float" if BUILT else "half"}
BF16 = 2.0**-8  # bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it


@pytest.mark.parametrize("shape", [(64, 32), (576, 576), (192, 1536)])
def test_tinygemm_layout_equals_aten_packer(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = to_tinygemm(codes.to(torch.uint8))
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(from_tinygemm(packed), codes.to(torch.uint8))


def test_unknown_int4_layout_dequantizes_instead(monkeypatch):
    """Where aten's int4 packer uses a layout llmkit does not know (layout_tile() == 0), int4 layers dequantize per
    call rather than feed the kernel wrongly ordered codes, and still equal F.linear."""
    monkeypatch.setattr("llmkit.quant.linear.layout_tile", lambda: 0)
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = QuantLinear.from_linear(linear, "int4", 32)
    assert layer.kernel == "dequantize"
    x = torch.randn(1, 128)
    expected = F.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 40, 200])  # 200: over every kernel_rows, the dequantize path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_f_linear_of_the_dequantized_weight(scheme, rows, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True)
    layer = QuantLinear.from_linear(linear, scheme)
    assert layer.kernel == KERNELS[scheme]
    packed = get_format(scheme).quantize(linear.weight, None)
    assert all(torch.equal(a, b) for a, b in zip(layer.packed.tensors.values(), packed.tensors.values()))
    x = torch.randn(2, rows // 2 or 1, 256).to(dtype)
    w_hat = get_format(scheme).dequantize(packed, torch.float32)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 128)
    reference = F.linear(x.double(), w_hat.double(), linear.bias.double())
    fast_path = x.numel() // 256 <= layer.kernel_rows
    if fast_path and layer.kernel == "gguf":  # int8 activations per block of 32 (tests/helpers.py)
        bound = int8_activation_bound(x, w_hat) + 2 * BF16 * reference.abs().reshape(-1, 128) + 1e-5
        assert bool(((y.double() - reference).abs().reshape(-1, 128) <= bound).all())
    elif fast_path or dtype == torch.bfloat16:
        # bf16 rounds x, the kernel's scales and y: |y - y_ref| <= 2^-8 (|x| |W_hat|^T + |y_ref|) (+ bias in bf16)
        scale = F.linear(x.double().abs(), w_hat.double().abs()) + reference.abs() + linear.bias.double().abs()
        assert bool(((y.double() - reference).abs() <= 2 * BF16 * scale).all())
    else:  # the same fp32 F.linear on the same numbers as the reference, up to fp32 summation order
        expected = F.linear(x, w_hat, linear.bias)
        assert torch.allclose(y, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", "f16", "int8"])
def test_dequantized_prompt_product_on_onednn(scheme, monkeypatch):
    """With onednn_prompts (load_decoder's use_onednn_for_prompts) a prompt's rows under inference mode multiply the
    dequantized weight on oneDNN: F.linear's float32 numbers up to the order of the sums; under no_grad, F.linear."""
    import llmkit.nn.linear as linear_module

    calls = []
    real = linear_module.prompt_product
    monkeypatch.setattr(linear_module, "prompt_product", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr("llmkit.quant.linear.prompt_product", linear_module.prompt_product)
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True)
    layer = QuantLinear.from_linear(linear, scheme)
    layer.onednn_prompts = True
    x = torch.randn(2, 100, 256)  # over every kernel_rows: the dequantize path
    expected = F.linear(x, layer.dequantized_weight(), linear.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), expected) and calls == []
    with torch.inference_mode():
        y = layer(x)
    assert calls == [1]
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)


def test_kernel_choice_by_format():
    for scheme, kernel in KERNELS.items():
        # 96 output rows: not a multiple of the int4 kernel's tile of 64, which pads them
        assert kernel_for(get_format(scheme).quantize(torch.randn(96, 256), None)) == kernel


@pytest.mark.parametrize("scheme", affine.AFFINE_SCHEMES)
def test_affine_view_equals_the_format_and_rebuilds_its_bytes(scheme):
    torch.manual_seed(0)
    packed = get_format(scheme).quantize(torch.randn(96, 512), None)
    view = affine.split(packed)
    rebuilt = affine.join(scheme, packed.shape, packed.group_size, view.codes, view.extras)
    assert rebuilt.tensors.keys() == packed.tensors.keys()
    assert all(torch.equal(rebuilt.tensors[k], t) for k, t in packed.tensors.items())
    if scheme.startswith("int4"):  # (q - zero) scale vs s q + z: one fp32 rounding apart
        assert torch.allclose(view.dequantize(), get_format(scheme).dequantize(packed), rtol=1e-6, atol=1e-7)
    else:  # the dequantizer's own products, bit for bit
        assert torch.equal(view.dequantize(), get_format(scheme).dequantize(packed))


@pytest.mark.parametrize("scheme", ["q8_0", "q5_0", "q5_1", "q5_k"])
def test_wide_codes_split_into_two_4_bit_pieces_exactly(scheme):
    torch.manual_seed(0)
    view = affine.split(get_format(scheme).quantize(torch.randn(96, 512), None))  # 96 rows: padded to 128
    codes, scales = kernel_weight(view, pieces=2)
    assert codes.shape == (128, 512) and scales.shape == (2 * 512 // 32, 128, 2)
    kernel_codes = from_tinygemm(codes)
    assert torch.equal(codes_of(kernel_codes, 2)[:96], view.codes)
    assert bool((kernel_codes[96:] == 0).all()) and bool((scales[:, 96:] == 0).all())
    # the weight the kernel computes with, (u - 8) s + z' per piece, summed over the two pieces
    u = kernel_codes[:96].float().view(96, 2, -1, 32)  # (out, piece, group, 32)
    s, z = scales[:, :96].float().view(2, -1, 96, 2).permute(2, 0, 1, 3).unbind(-1)  # (out, piece, group) each
    w_kernel = ((u - 8) * s[..., None] + z[..., None]).sum(1).view(96, 512)
    w_hat = view.dequantize()
    # bf16 scales: each of 16 s, s and 8 s + z is within 2^-8 of itself (8 significant bits), so
    # |dw| <= 2^-8 (|16 s h| + |s (l - 8)| + |8 s + z|)
    h, low = (view.codes >> 4).float().view(96, -1, 32), (view.codes & 15).float().view(96, -1, 32)
    step, offset = view.step[..., None], view.offset[..., None]
    bound = 2.0**-8 * (16 * (step * h).abs() + (step * (low - 8)).abs() + (8 * step + offset).abs()) + 1e-7
    assert bool(((w_kernel - w_hat).abs() <= bound.view(96, 512)).all())


@pytest.mark.parametrize("scheme", sorted(set(affine.AFFINE_SCHEMES) - {"int4", "int4_asym"}))
@pytest.mark.parametrize("rows", [1, 40, 200])  # 200: over every kernel_rows, the dequantize path
def test_gguf_block_formats_through_the_int4_kernel_equal_f_linear(scheme, rows, monkeypatch):
    monkeypatch.setattr(native, "native_kernels_available", lambda: False)  # Q4_0/Q4_1/Q8_0's fallback path too
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96, bias=True)  # 96 output rows: not a multiple of the kernel's tile of 64
    layer = QuantLinear(get_format(scheme).quantize(linear.weight, None), linear.bias)
    assert layer.kernel == "int4pack"
    w_hat = layer.dequantized_weight()
    x = torch.randn(rows, 512)
    with torch.no_grad():
        y = layer(x)
    reference = F.linear(x.double(), w_hat.double(), linear.bias.double())
    if rows <= layer.kernel_rows:  # bf16 x, scales and y (see the test above the int4 family)
        scale = F.linear(x.double().abs(), w_hat.double().abs()) + reference.abs() + linear.bias.double().abs()
        assert bool(((y.double() - reference).abs() <= 2 * BF16 * scale).all())
    else:  # dequantize-then-F.linear in fp32
        assert torch.allclose(y, F.linear(x, w_hat, linear.bias), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4", "q4_1", "nf4"])
def test_buffers_stay_packed_through_model_casts_and_hold_no_float_weight(scheme):
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 128), scheme)
    before = {name: buffer.dtype for name, buffer in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert {name: buffer.dtype for name, buffer in layer.named_buffers()} == before
    assert not any(p.requires_grad for p in layer.parameters())
    packed_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert packed_bytes < 0.4 * 128 * 128 * 4  # well under the fp32 weight (int8 + scales: 0.26)


def test_unaligned_packed_tensors_are_copied_before_the_kernel_reads_them():
    # safetensors returns tensors at arbitrary file offsets; aten's int8 kernel segfaulted on one of them
    packed = get_format("int8").quantize(torch.randn(64, 64), None)
    storage = torch.empty(64 * 64 + 1, dtype=torch.int8)
    unaligned = storage[1:].view(64, 64)
    unaligned.copy_(packed.tensors["qweight"])
    assert unaligned.data_ptr() % 64 != 0
    packed.tensors["qweight"] = unaligned
    layer = QuantLinear(packed)
    assert layer.weight_qweight.data_ptr() % 64 == 0 and torch.equal(layer.weight_qweight, unaligned)
    x = torch.randn(3, 64)
    with torch.no_grad():
        # bf16 activations on the kernel path: a few 2^-8 of |x| |W_hat| (the bound tested above)
        assert torch.allclose(layer(x), F.linear(x, get_format("int8").dequantize(packed)), rtol=0.02, atol=0.1)
