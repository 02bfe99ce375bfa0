"""K-quants Q4_K / Q5_K / Q6_K: llmkit's bytes read by the `gguf` package bit for bit equal to llmkit's dequantize
(also on arbitrary bytes), every code the nearest point of its sub-block's grid, the scale search better than plain
round to nearest and the RMSE against gguf's Q4_0 / Q8_0, re-quantization, the vectorised quantizer against a
scalar transcription of llama.cpp's reference loops, bad input, and real SmolLM2 tensors."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmkit import LlmkitError
from llmkit.quant.kquants import (
    BLOCK_BYTES,
    DEQUANTIZE,
    QK_K,
    QUANTIZE,
    dequantize_q4_k,
    quantize_q4_k,
    quantize_q6_k,
    unpack_scales_mins,
)

FORMATS = ["q4_k", "q5_k", "q6_k"]
GGUF_TYPE = {"q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
NMAX = {"q4_k": 15, "q5_k": 31}
F32 = np.float32


def weights(kind: str, rows: int = 16, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal((rows, cols)).astype(F32)
    if kind == "uniform":
        return rng.uniform(-3, 3, (rows, cols)).astype(F32)
    if kind == "awkward":  # zero, constant, one-signed, tiny, large, sparse and outlier rows in one tensor
        w = rng.standard_normal((rows, cols)).astype(F32)
        w[0] = 0
        w[1] = 0.25
        w[2] = -np.abs(w[2])
        w[3] = np.abs(w[3]) + 1
        w[4] *= 1e-6
        w[5] *= 300
        w[6, rng.random(cols) < 0.9] = 0
        w[7, ::37] = 40
        w[8, :32] = 0  # one all-zero sub-block in an otherwise normal super-block
        w[9, :16] = -1.5  # a constant sub-block
        return w
    raise ValueError(kind)


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=F32).view(np.uint32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["normal", "uniform", "awkward"])
def test_gguf_reads_llmkit_bytes_bit_for_bit(fmt, kind):
    w = weights(kind)
    packed = QUANTIZE[fmt](w)
    assert packed.dtype == np.uint8 and packed.shape == (16, 512 // QK_K * BLOCK_BYTES[fmt])
    ours = DEQUANTIZE[fmt](packed, w.shape)
    reference = gguf_dequantize(packed, GGUF_TYPE[fmt])
    assert ours.dtype == np.float32 and ours.shape == reference.shape == w.shape
    np.testing.assert_array_equal(bits(ours), bits(reference))
    assert np.isfinite(ours).all()
    assert np.abs(ours - w).max() <= 0.2 * np.abs(w).max() + 1e-30  # a real reconstruction, not just a matching read


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_arbitrary_bytes_like_gguf(fmt):
    """Every bit of the layout, also patterns llmkit's quantizer never writes (high bits of 6-bit scales, negative
    Q6_K scales): random bytes with finite fp16 d/dmin read the same as gguf reads them."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (64, BLOCK_BYTES[fmt]), dtype=np.uint8)
    halves = rng.uniform(-2, 2, (64, 2)).astype("<f2").view(np.uint8)  # (64, 4): two finite fp16 values per block
    if fmt == "q6_k":
        blocks[:, 208:210] = halves[:, :2]
    else:
        blocks[:, 0:4] = halves
    np.testing.assert_array_equal(bits(DEQUANTIZE[fmt](blocks, (8, 8 * QK_K))),
                                  bits(gguf_dequantize(blocks.reshape(8, -1), GGUF_TYPE[fmt])))


def grids(fmt: str, packed: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, lowest, highest) of every value's sub-block grid, read from the bytes, each shaped like the weight."""
    blocks = packed.reshape(-1, BLOCK_BYTES[fmt])
    if fmt == "q6_k":
        d = blocks[:, 208:210].copy().view("<f2").astype(F32)  # (n, 1)
        step = d * blocks[:, 192:208].view(np.int8).astype(F32)  # (n, 16), may be negative
        low, high = np.minimum(-32 * step, 31 * step), np.maximum(-32 * step, 31 * step)
        step, size = np.abs(step), 16
    else:
        d, dmin = blocks[:, 0:2].copy().view("<f2").astype(F32), blocks[:, 2:4].copy().view("<f2").astype(F32)
        sc, mins = unpack_scales_mins(blocks[:, 4:16])
        step, low = d * sc.astype(F32), -(dmin * mins.astype(F32))
        high, size = low + NMAX[fmt] * step, 32
    return [np.repeat(a, size, axis=1).reshape(shape) for a in (step, low, high)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["normal", "awkward"])
def test_every_code_is_the_nearest_grid_point(fmt, kind):
    """The error bound: |clamp(w, grid) - w_hat| <= step / 2 (a value inside its sub-block's grid is off by at most
    half a step, one outside lands on the nearest end), and a sub-block with step 0 reconstructs as its min."""
    w = weights(kind, rows=32)
    packed = QUANTIZE[fmt](w)
    w_hat = DEQUANTIZE[fmt](packed, w.shape)
    step, low, high = grids(fmt, packed, w.shape)
    slack = 1e-5 * np.maximum(np.abs(w), np.abs(low) + np.abs(high)) + 1e-30  # float32 rounding of the products
    np.testing.assert_array_less(np.abs(np.clip(w, low, high) - w_hat), step / 2 + slack)
    flat = step == 0
    np.testing.assert_array_equal(w_hat[flat], low[flat])
    if kind == "normal":  # the search clamps a few extremes (1.6-4 %), each by less than one step
        assert ((w < low - slack) | (w > high + slack)).mean() < 0.05
        np.testing.assert_array_less(np.abs(w - w_hat), step + slack)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def gguf_rmse(w: np.ndarray, qtype: GGMLQuantizationType) -> float:
    return rmse(gguf_dequantize(gguf_quantize(w, qtype), qtype), w)


def test_rmse_on_normal_weights_search_beats_round_to_nearest_and_q4_0():
    w = weights("normal", rows=128, cols=1024, seed=2)
    figures = {fmt: rmse(DEQUANTIZE[fmt](QUANTIZE[fmt](w), w.shape), w) for fmt in FORMATS}
    plain = {fmt: rmse(DEQUANTIZE[fmt](QUANTIZE[fmt](w, search=False), w.shape), w) for fmt in FORMATS}
    q4_0, q8_0 = gguf_rmse(w, GGMLQuantizationType.Q4_0), gguf_rmse(w, GGMLQuantizationType.Q8_0)
    for fmt in FORMATS:
        assert figures[fmt] < 0.97 * plain[fmt], (fmt, figures[fmt], plain[fmt])
    assert figures["q4_k"] < 0.9 * q4_0  # 4.5 bits with searched scales beat Q4_0's 4.5 bits
    assert figures["q6_k"] < figures["q5_k"] / 1.8 < figures["q4_k"] / 3.2  # each extra bit about halves the error
    assert figures["q6_k"] < 4 * q8_0  # two bits fewer than Q8_0, 2^2 times its error at most
    # the figures the module docstring quotes
    expected = {"q4_k": 0.0712, "q5_k": 0.0361, "q6_k": 0.01765}
    for fmt, value in expected.items():
        assert figures[fmt] == pytest.approx(value, rel=0.03), (fmt, figures[fmt])
    assert (q4_0, q8_0) == pytest.approx((0.0858, 0.00534), rel=0.03)


@pytest.mark.parametrize("fmt", FORMATS)
def test_requantizing_a_dequantized_tensor(fmt):
    """Q4_K: the same bytes for nearly every block; Q6_K: the same values (the bytes may pick the opposite
    sign of d and scales, so a zero may come back as -0.0); Q5_K: its 16-step search cannot always land on a grid
    that uses only part of the code range, so values move, by an RMSE well under the first quantization's."""
    w = weights("normal", rows=64, cols=1024, seed=3)
    first = QUANTIZE[fmt](w)
    w_hat = DEQUANTIZE[fmt](first, w.shape)
    second = QUANTIZE[fmt](w_hat)
    again = DEQUANTIZE[fmt](second, w.shape)
    changed_blocks = (first.reshape(-1, BLOCK_BYTES[fmt]) != second.reshape(-1, BLOCK_BYTES[fmt])).any(axis=1).mean()
    if fmt == "q4_k":
        assert changed_blocks < 0.01
        assert rmse(again, w_hat) < 0.01 * rmse(w_hat, w)
    elif fmt == "q6_k":
        np.testing.assert_array_equal(again, w_hat)  # equal values; a zero may come back as -0.0
    else:
        assert rmse(again, w_hat) < 0.2 * rmse(w_hat, w)
    assert rmse(again, w) <= 1.01 * rmse(w_hat, w)


# --- a scalar transcription of llama.cpp's reference loops (ggml-quants.c), one value at a time in float32 numpy
# scalars, held against the vectorised quantizer: the same bytes.


def nearest_int(v) -> int:  # noqa: ANN001
    return int(np.rint(F32(v)))


def scalar_min_scale_search(x, w, nmax, rmin, rdelta, nstep):  # noqa: ANN001, ANN201
    n = len(x)
    low, high = F32(x.min()), F32(x.max())
    sum_w, sum_x = F32(w[0]), F32(w[0]) * x[0]
    for i in range(1, n):
        sum_w, sum_x = F32(sum_w + w[i]), F32(sum_x + w[i] * x[i])
    low = min(low, F32(0))
    if high == low:
        return F32(0), F32(-low), [0] * n
    iscale = F32(nmax) / (high - low)
    scale = F32(1) / iscale
    codes, best = [], F32(0)
    for i in range(n):
        codes.append(max(0, min(nmax, nearest_int(iscale * (x[i] - low)))))
        diff = scale * F32(codes[i]) + low - x[i]
        best = F32(best + w[i] * (diff * diff))
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)
        trial = [max(0, min(nmax, nearest_int(iscale * (x[i] - low)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = F32(0)
        for i in range(n):
            wl = w[i] * F32(trial[i])
            sum_l, sum_l2, sum_xl = F32(sum_l + wl), F32(sum_l2 + wl * F32(trial[i])), F32(sum_xl + wl * x[i])
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = F32(0), sum_xl / sum_l2
            error = F32(0)
            for i in range(n):
                diff = this_scale * F32(trial[i]) + this_min - x[i]
                error = F32(error + w[i] * (diff * diff))
            if error < best:
                codes, best, scale, low = trial, error, this_scale, this_min
    return scale, F32(-low), codes


def scalar_q45_k_block(x: np.ndarray, nmax: int) -> bytes:
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, codes = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        sum_x2 = F32(0)
        for v in sub:
            sum_x2 = F32(sum_x2 + v * v)
        w = np.sqrt(sum_x2 / F32(32)) + np.abs(sub)
        s, m, c = scalar_min_scale_search(sub, w, nmax, rmin, 0.1, nstep)
        scales.append(s)
        mins.append(m)
        codes += c
    max_scale, max_min = max([F32(0), *scales]), max([F32(0), *mins])
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    sc = [min(63, nearest_int(inv_scale * s) & 0xFF) for s in scales]
    mn = [min(63, nearest_int(inv_min * m) & 0xFF) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = sc[j], mn[j]
        else:
            packed[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4)
            packed[j - 4] |= (sc[j] >> 4) << 6
            packed[j] |= (mn[j] >> 4) << 6
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        step = F32(d) * F32(sc[j])
        if step == 0:
            continue
        offset = F32(dmin) * F32(mn[j])
        for i in range(32):
            codes[32 * j + i] = max(0, min(nmax, nearest_int((x[32 * j + i] + offset) / step)))
    qs = [(codes[64 * k + i] & 0xF) | ((codes[64 * k + 32 + i] & 0xF) << 4) for k in range(4) for i in range(32)]
    qh = [sum(((codes[32 * j + i] >> 4) & 1) << j for j in range(8)) for i in range(32)] if nmax == 31 else []
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qh) + bytes(qs)


def scalar_symmetric_search(x, nmax):  # noqa: ANN001, ANN201
    peak = F32(0)
    for v in x:
        if abs(v) > abs(peak):
            peak = v
    if abs(peak) < F32(1e-15):
        return F32(0), [0] * len(x)

    def fit(iscale):  # noqa: ANN001, ANN202
        codes = [max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
        sum_lx = sum_l2 = F32(0)
        for v, code in zip(x, codes, strict=True):
            w = v * v
            sum_lx, sum_l2 = F32(sum_lx + w * v * F32(code)), F32(sum_l2 + w * F32(code) * F32(code))
        return codes, sum_lx, sum_l2

    codes, sum_lx, sum_l2 = fit(F32(-nmax) / peak)
    scale = sum_lx / sum_l2 if sum_l2 else F32(0)
    best = scale * sum_lx
    for step in [*range(-9, 0), *range(1, 10)]:
        trial, sum_lx, sum_l2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
        if sum_l2 > 0 and sum_lx * sum_lx > best * sum_l2:
            codes, scale = trial, sum_lx / sum_l2
            best = scale * sum_lx
    return scale, [c + nmax for c in codes]


def scalar_q6_k_block(x: np.ndarray) -> bytes:
    scales, codes = [], []
    for j in range(16):
        s, c = scalar_symmetric_search(x[16 * j:16 * j + 16], 32)
        scales.append(s)
        codes += c
    max_scale = F32(0)
    for s in scales:
        if abs(s) > abs(max_scale):
            max_scale = s
    if abs(max_scale) < F32(1e-15):
        return bytes(210)
    iscale = F32(-128) / max_scale
    d = np.float16(F32(1) / iscale)
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        step = F32(d) * F32(sc[j])
        if step == 0:
            continue
        for i in range(16):
            codes[16 * j + i] = max(-32, min(31, nearest_int(x[16 * j + i] / step))) + 32
    ql, qh = [], []
    for half in range(2):
        q = codes[128 * half:128 * half + 128]
        ql += [(q[i] & 0xF) | ((q[i + 64] & 0xF) << 4) for i in range(32)]
        ql += [(q[i + 32] & 0xF) | ((q[i + 96] & 0xF) << 4) for i in range(32)]
        qh += [(q[i] >> 4) | ((q[i + 32] >> 4) << 2) | ((q[i + 64] >> 4) << 4) | ((q[i + 96] >> 4) << 6)
               for i in range(32)]
    return bytes(ql) + bytes(qh) + np.array(sc, dtype=np.int8).tobytes() + d.tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_vectorised_quantizer_equals_scalar_reference_loops(fmt):
    w = weights("awkward", rows=12, cols=QK_K, seed=4)  # one super-block per row, the edge cases included
    scalar = scalar_q6_k_block if fmt == "q6_k" else lambda x: scalar_q45_k_block(x, NMAX[fmt])
    expected = np.frombuffer(b"".join(scalar(row) for row in w), dtype=np.uint8).reshape(12, -1)
    np.testing.assert_array_equal(QUANTIZE[fmt](w), expected)


# --- input forms and bad input


def test_torch_input_and_output_shapes():
    w = torch.randn(4, 2 * QK_K, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(quantize_q4_k(w), quantize_q4_k(w.numpy()))
    np.testing.assert_array_equal(quantize_q6_k(w.to(torch.bfloat16)), quantize_q6_k(w.to(torch.bfloat16).float()))
    packed = torch.from_numpy(quantize_q4_k(w))
    assert dequantize_q4_k(packed, (4, 2 * QK_K)).shape == (4, 2 * QK_K)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input_is_one_clear_error(fmt):
    with pytest.raises(LlmkitError, match=r"multiple of 256.*\(8, 576\).*pad the rows to 768"):
        QUANTIZE[fmt](np.zeros((8, 576), dtype=F32))
    with pytest.raises(LlmkitError, match="2-D"):
        QUANTIZE[fmt](np.zeros(512, dtype=F32))
    with pytest.raises(LlmkitError, match="2-D floating-point"):
        QUANTIZE[fmt](np.zeros((2, 512), dtype=np.int32))
    bad = np.zeros((2, 512), dtype=F32)
    bad[1, 7] = np.nan
    with pytest.raises(LlmkitError, match="NaN"):
        QUANTIZE[fmt](bad)
    packed = QUANTIZE[fmt](np.ones((2, 512), dtype=F32))
    with pytest.raises(LlmkitError, match=f"must be {8 * BLOCK_BYTES[fmt]} uint8 bytes"):
        DEQUANTIZE[fmt](packed, (2, 1024))
    with pytest.raises(LlmkitError, match="multiple of 256"):
        DEQUANTIZE[fmt](packed, (4, 100))


# --- real weights: SmolLM2-135M-Instruct's Q4_1 tensors, dequantized by gguf, re-quantized to K-quants


@pytest.mark.slow
def test_smollm2_tensors_requantized():
    from gguf import GGUFReader

    from llmkit.checkpoints import default_model_path

    reader = GGUFReader(default_model_path())
    tensors = {t.name: t for t in reader.tensors}
    for name in ["blk.0.ffn_down.weight", "blk.15.ffn_down.weight", "blk.29.ffn_down.weight"]:
        tensor = tensors[name]
        w = gguf_dequantize(tensor.data, tensor.tensor_type)  # (576, 1536): rows of 1536 = 6 super-blocks
        assert w.shape == (576, 1536)
        errors = {}
        for fmt in FORMATS:
            packed = QUANTIZE[fmt](w)
            w_hat = DEQUANTIZE[fmt](packed, w.shape)
            np.testing.assert_array_equal(bits(w_hat), bits(gguf_dequantize(packed, GGUF_TYPE[fmt])))
            step, low, high = grids(fmt, packed, w.shape)
            slack = 1e-5 * np.maximum(np.abs(w), np.abs(low) + np.abs(high)) + 1e-30
            np.testing.assert_array_less(np.abs(np.clip(w, low, high) - w_hat), step / 2 + slack)
            errors[fmt] = rmse(w_hat, w)
        q4_0, q8_0 = gguf_rmse(w, GGMLQuantizationType.Q4_0), gguf_rmse(w, GGMLQuantizationType.Q8_0)
        scale = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
        print(name, {k: round(v / scale, 4) for k, v in errors.items()}, "q4_0", round(q4_0 / scale, 4),
              "q8_0", round(q8_0 / scale, 4), "(RMSE / RMS of the weight)")
        # SmolLM2's weights already lie on a Q4_1 grid (32-wide blocks, 16 levels): Q4_K's 32-wide sub-blocks with
        # 16 levels nearly reproduce it (only its 6-bit scales and mins round), so here Q4_K beats Q5_K, whose 32
        # levels do not contain the 16; all K-quants beat Q4_0 (16 symmetric levels) by far
        assert max(errors.values()) < q4_0 / 3
        assert errors["q4_k"] < errors["q5_k"]
        assert errors["q6_k"] < 4 * q8_0
