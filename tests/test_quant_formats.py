"""One behaviour suite over llmkit.quant.FORMATS: round-trip error within each format's stated bound (uniform and
normal weights), shapes and dtypes, bad input; and the GGUF block formats byte-for-byte against gguf.quants."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmkit import LlmkitError
from llmkit.quant.formats import FORMATS, dequantize_weight, quantize_weight
from llmkit.quant.nf4 import NF4_CODE_BOOK

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_1": GGMLQuantizationType.Q4_1}
SLACK = 1e-6  # fp32 products and quotients round once or twice: a few ulps of the group's largest |w|
FP16 = 2.0**-11  # relative rounding of a fp16 scale (normal range)


def weights(distribution: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn(96, 256, generator=generator) * 0.05
    return torch.rand(96, 256, generator=generator) * 2 - 1


def groups_of(w: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> per-element view of its groups along the input dimension, (out, in / g, g)."""
    return w.view(w.shape[0], -1, g)


def bound(scheme: str, w: torch.Tensor) -> torch.Tensor:
    """The per-element bound each module's docstring states, computed here from the float weight alone."""
    if scheme == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 / 2).expand_as(w)
    if scheme in ("int4", "int4_asym"):
        b = groups_of(w, 32)
        if scheme == "int4":
            s = b.abs().amax(-1, keepdim=True) / 7
        else:
            s = (b.amax(-1, keepdim=True).clamp_min(0) - b.amin(-1, keepdim=True).clamp_max(0)) / 15
        return (s / 2).expand_as(b).reshape(w.shape)
    b = groups_of(w, 32)
    if scheme == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        return (d * (0.5 + 127 * FP16)).expand_as(b).reshape(w.shape)
    if scheme == "q4_0":
        d = b.abs().amax(-1, keepdim=True) / 8
        return (d * (1 + 8 * FP16)).expand_as(b).reshape(w.shape)
    if scheme == "q4_1":
        low, high = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (high - low) / 15
        return (d * (0.5 + 15 * FP16) + low.abs() * FP16).expand_as(b).reshape(w.shape)
    # nf4: blocks of 64 over the row-major weight; s max_gap / 2 + c / 254 with c <= max block absmax
    s = w.reshape(-1, 64).abs().amax(-1, keepdim=True)
    max_half_gap = float((NF4_CODE_BOOK[1:] - NF4_CODE_BOOK[:-1]).max()) / 2
    return (s * max_half_gap + s.max() / 254).expand(-1, 64).reshape(w.shape)


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
@pytest.mark.parametrize("scheme", list(FORMATS))
def test_round_trip_error_within_the_stated_bound(scheme, distribution):
    w = weights(distribution)
    packed = quantize_weight(w, scheme)
    assert packed.scheme == scheme and packed.shape == (96, 256)
    restored = dequantize_weight(packed)
    assert restored.shape == w.shape and restored.dtype == torch.float32
    error = (w - restored).abs()
    assert bool((error <= bound(scheme, w) + SLACK * w.abs().max()).all())
    assert error.max() > 0  # a real rounding happened
    # the bound is tight: the worst element uses a good part of it (a too-loose bound would hide a wrong scale)
    assert bool((error / bound(scheme, w)).max() > 0.3)


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_bits_dtypes_and_determinism(scheme):
    w = weights("normal")
    packed = quantize_weight(w, scheme)
    expected_bits = {"int8": 8 + 32 / 256, "int4": 5.0, "int4_asym": 5.25, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}
    if scheme in expected_bits:
        assert packed.bits_per_weight == expected_bits[scheme]
    else:
        assert 4.12 < packed.bits_per_weight < 4.14
    assert all(not t.is_floating_point() or t.dtype == torch.float32 for t in packed.tensors.values())
    assert any(t.dtype in (torch.int8, torch.uint8) for t in packed.tensors.values())
    again = quantize_weight(w.t().contiguous().t(), scheme)  # column-major storage: same values, same bytes
    assert all(torch.equal(a, b) for a, b in zip(packed.tensors.values(), again.tensors.values()))
    assert dequantize_weight(packed, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_all_zero_weight_round_trips_to_zeros(scheme):
    w = torch.zeros(64, 128)
    assert torch.equal(dequantize_weight(quantize_weight(w, scheme)), w)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_int4_groups(scheme, group_size):
    w = weights("uniform")
    packed = quantize_weight(w, scheme, group_size)
    assert packed.tensors["codes"].shape == (96, 128) and packed.tensors["scale"].shape == (96, 256 // group_size)
    s = groups_of(w, group_size).abs().amax(-1) / 7 if scheme == "int4" else packed.tensors["scale"]
    per_element = s.repeat_interleave(group_size, dim=1)
    assert bool(((w - dequantize_weight(packed)).abs() <= per_element / 2 + SLACK).all())


@pytest.mark.parametrize("scheme", list(GGUF_TYPES))
@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_gguf_blocks_equal_gguf_quants_bit_for_bit(scheme, distribution):
    w = weights(distribution, seed=3)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) / 8 - 2  # exact halves: roundf ties
    packed = quantize_weight(w, scheme)
    reference = gguf_quantize(w.numpy(), GGUF_TYPES[scheme])
    assert np.array_equal(packed.tensors["blocks"].numpy(), reference)
    ours = dequantize_weight(packed).numpy()
    assert np.array_equal(gguf_dequantize(packed.tensors["blocks"].numpy(), GGUF_TYPES[scheme]), ours)


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_bad_inputs_are_one_clear_error(scheme):
    with pytest.raises(LlmkitError, match="2-D floating-point"):
        quantize_weight(torch.ones(4, 4, 4), scheme)
    with pytest.raises(LlmkitError, match="2-D floating-point"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int32), scheme)
    bad = torch.ones(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(LlmkitError, match="inf or NaN"):
        quantize_weight(bad, scheme)
    with pytest.raises(LlmkitError, match="group_size"):
        quantize_weight(torch.ones(4, 64), scheme, 48)


def test_group_not_dividing_the_width_names_the_flag_and_a_fix():
    with pytest.raises(LlmkitError, match=r"--group_size 128 does not divide in_features 576.*--group_size 64"):
        quantize_weight(torch.ones(8, 576), "int4", 128)
    with pytest.raises(LlmkitError, match="divisible by 32"):
        quantize_weight(torch.ones(8, 48), "q4_0")
    with pytest.raises(LlmkitError, match="unknown --scheme 'int5'"):
        quantize_weight(torch.ones(8, 64), "int5")
