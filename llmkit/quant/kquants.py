"""GGML's K-quants Q4_K, Q5_K and Q6_K, read and written in llmkit, byte for byte in the layout llama.cpp and the
`gguf` package use (ggml-common.h's block_q4_K / block_q5_K / block_q6_K). The `gguf` package dequantizes these types
but cannot write them; `quantize_q4_k` and friends can.

A weight (rows, cols) is cut, row by row, into super-blocks of QK_K = 256 values (cols must be a multiple of 256);
each super-block becomes one fixed-size block of bytes, and the blocks of a row follow each other, so the packed
array is uint8 (rows, cols / 256 * block_bytes). Multi-byte fields are little-endian.

Q4_K, 144 bytes per 256 values (4.5 bits/weight): 8 sub-blocks of 32, each with a 6-bit scale sc_j and a 6-bit min
m_j, and 4-bit codes q in 0..15:

    d (fp16, 2) | dmin (fp16, 2) | scales (12) | qs (128)
    w_hat = (d * sc_j) * q - (dmin * m_j)

  The 12 scale bytes hold the 8 + 8 six-bit numbers: bytes 0-3 are sc_0..3 in their low 6 bits, bytes 4-7 are
  m_0..3 likewise; bytes 8-11 are sc_4..7 (low nibble) and m_4..7 (high nibble); the top two bits of sc_4..7 sit in
  bits 6-7 of bytes 0-3 and those of m_4..7 in bits 6-7 of bytes 4-7. qs: each 64 values (two sub-blocks) share 32
  bytes, value l of the first in the low nibble of byte l, value l of the second in the high nibble.
Q5_K, 176 bytes per 256 (5.5 bits/weight): Q4_K with a fifth bit, codes q in 0..31:

    d (fp16, 2) | dmin (fp16, 2) | scales (12) | qh (32) | qs (128)

  qs holds the low 4 bits as in Q4_K; bit j of qh[l] is the high bit of value l of sub-block j.
Q6_K, 210 bytes per 256 (6.5625 bits/weight): 16 sub-blocks of 16, each with a signed 8-bit scale sc_j, and 6-bit
codes q in 0..63, symmetric around 32:

    ql (128) | qh (64) | scales (int8, 16) | d (fp16, 2)
    w_hat = (d * sc_j) * (q - 32)

  Each half of 128 values has 64 ql bytes and 32 qh bytes; its quarters k = 0..3 of 32 values put value l's low
  nibble in ql[l] (k = 0, 2: low, high nibble) or ql[32 + l] (k = 1, 3: low, high nibble), and its top 2 bits in
  bits 2k, 2k + 1 of qh[l].

Quantizer: llama.cpp's reference (`quantize_row_q{4,5,6}_K_ref`; `kquant_search` has the scale searches). Q4_K/Q5_K:
per sub-block, weights w_i = sqrt(mean x^2) + |x_i| and `min_scale_search` (Q4_K: nmax 15, rmin -1, rdelta 0.1, 20
steps; Q5_K: nmax 31, rmin -0.5, 15 steps) give a scale s_j and min m_j; then d = max s_j / 63, dmin = max m_j / 63
(fp16), sc_j = round(s_j / d), m_j = round(m_j / dmin) (6 bits), and every value is re-rounded on the final grid,
q = clamp(round((x + dmin m_j) / (d sc_j)), 0, nmax). Q6_K: `symmetric_scale_search` (nmax 32) per sub-block, then
d = -max_scale / 128 (the largest |scale|, signed), sc_j = min(127, round(scale_j / d)) and q - 32 =
clamp(round(x / (d sc_j)), -32, 31). search=False gives plain round to nearest with min/max (Q4_K/Q5_K) or absmax
(Q6_K) sub-block scales in the same layout, the baseline the search improves on.

Error bound. After the final rounding every code is the nearest point of its sub-block's grid: |w - w_hat| <= d sc_j
/ 2 (plus float32 rounding) for every w inside the grid, [-dmin m_j, -dmin m_j + nmax d sc_j] (Q4_K/Q5_K) or
[-32 d sc_j, 31 d sc_j] (Q6_K); a value outside it lands on the end code. The search trades a few extremes for a
lower weighted squared error, and the 6-/8-bit scales round: on N(0, 1) weights 4 % (Q4_K), 3.5 % (Q5_K) and 1.6 %
(Q6_K) of the values are clamped, by less than one step (|w - w_hat| < d sc_j); rows with outliers reach 1.6 steps.
A sub-block whose scale rounds to 0 reconstructs as its min (0 for Q6_K). RMSE on N(0, 1) weights: 0.071 (Q4_K),
0.036 (Q5_K), 0.0177 (Q6_K), against 0.086 (Q4_0) and 0.0053 (Q8_0) from `gguf.quants.quantize`, and 0.078, 0.038,
0.0188 for search=False (tests/test_quant_kquants.py checks these figures).

Exact vs approximate. `dequantize_*` computes the same float32 products in the same order as ggml and `gguf`
(equal bit for bit: tested, also on arbitrary bytes). The quantizer follows the C reference's float32 operations in
their order (sums one element after the other, round half to even, the search's running min), and equals a scalar
transcription of those loops byte for byte (tested); equality with llama.cpp's own output is not checked here (no
llama.cpp build), and a C build that contracts products into FMAs or reorders sums (-ffast-math) could round a
near-tie differently. Where C's behaviour is undefined (NaN/inf in a degenerate fit) the code is 0. Not implemented:
the importance-matrix path (`quantize_row_q4_K_impl`, `make_qkx3_quants`). Speed: about 1.2 s (Q4_K), 1 s (Q5_K),
0.6 s (Q6_K) per million weights on this 2-core machine; dequantizing, 6-10 ms per million.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmkit.errors import LlmkitError
from llmkit.quant.kquant_search import F32, GROUP_MAX_EPS, min_scale_search, round_clamp, seq_sum, symmetric_scale_search

if TYPE_CHECKING:
    import torch

QK_K = 256  # values per super-block
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
CHUNK_BLOCKS = 4096  # super-blocks quantized at once (bounds the search's temporary arrays to a few tens of MB)


def _weight_matrix(weight: np.ndarray | torch.Tensor, fmt: str) -> np.ndarray:
    """`weight` as a float32 numpy (rows, cols) array, cols a multiple of 256, all values finite."""
    if hasattr(weight, "detach"):  # a torch tensor, without importing torch here
        weight = weight.detach().float().cpu().numpy()
    weight = np.asarray(weight)
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise LlmkitError(f"{fmt.upper()} quantizes 2-D floating-point weights (rows, cols); got a {weight.ndim}-D "
                          f"{weight.dtype} array of shape {tuple(weight.shape)}: reshape it to (rows, cols)")
    rows, cols = weight.shape
    if cols == 0 or cols % QK_K:
        raise LlmkitError(f"{fmt.upper()} packs rows in super-blocks of {QK_K} values, so the number of columns must "
                          f"be a positive multiple of {QK_K}; got a weight of shape {(rows, cols)}: pad the rows to "
                          f"{max(QK_K, -(-cols // QK_K) * QK_K)} columns, or use a 32-wide block format "
                          "(Q8_0, Q4_0, Q4_1) for this tensor as llama.cpp does")
    weight = weight.astype(F32, copy=False)
    if not np.isfinite(weight).all():
        raise LlmkitError(f"{fmt.upper()} cannot quantize a weight of shape {(rows, cols)} holding NaN or inf "
                          "values: find where they came from (a diverged run, an overflowed fp16 cast)")
    return weight


def _packed_blocks(data: np.ndarray | torch.Tensor, shape: tuple[int, int], fmt: str) -> np.ndarray:
    """The packed bytes as (n_blocks, block_bytes) uint8, checked against `shape`."""
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if len(shape) != 2 or shape[1] % QK_K or shape[1] <= 0 or shape[0] < 0:
        raise LlmkitError(f"{fmt.upper()} data describes a (rows, cols) weight with cols a positive multiple of "
                          f"{QK_K}; got shape {tuple(shape)}")
    n_blocks = shape[0] * shape[1] // QK_K
    if data.dtype != np.uint8 or data.size != n_blocks * BLOCK_BYTES[fmt]:
        raise LlmkitError(f"{fmt.upper()} data for shape {tuple(shape)} must be {n_blocks * BLOCK_BYTES[fmt]} uint8 "
                          f"bytes ({BLOCK_BYTES[fmt]} per {QK_K} values); got {data.size} {data.dtype} values")
    return data.reshape(n_blocks, BLOCK_BYTES[fmt])


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8, the little-endian fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return values.astype("<f2").reshape(-1, 1).view(np.uint8)


def _fp16_values(two_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n,) float32."""
    return np.ascontiguousarray(two_bytes).view("<f2").reshape(-1).astype(F32)


# --- Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and mins


def pack_scales_mins(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins per block, (n, 8) uint8 each -> the 12 bytes (n, 12) (module doc)."""
    low_sc, high_sc, low_m, high_m = sc[:, :4], sc[:, 4:], mins[:, :4], mins[:, 4:]
    return np.concatenate([low_sc | ((high_sc >> 4) << 6), low_m | ((high_m >> 4) << 6),
                           (high_sc & 0xF) | ((high_m & 0xF) << 4)], axis=1).astype(np.uint8)


def unpack_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes (n, 12) -> (scales, mins), (n, 8) uint8 each."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([first & 0x3F, (third & 0xF) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], axis=1)
    return sc, mins


def _quantize_min_blocks(blocks: np.ndarray, nmax: int, rmin: float, nstep: int, search: bool,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K of (n, 256) float32 values -> (d fp16 bytes (n, 2), dmin bytes (n, 2), 12 scale bytes, codes (n, 256))."""
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)  # (n * 8, 32): one row per sub-block
    typical = np.sqrt(seq_sum(sub * sub) / F32(32))  # C's av_x, per sub-block
    weights = typical[:, None] + np.abs(sub)
    scales, mins, codes = min_scale_search(sub, weights, nmax, rmin, 0.1, nstep if search else 0)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C stores nearest_int in a uint8_t before MIN(63, .): a negative result wraps around, then saturates at 63
    sc = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    mn = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d_bytes, dmin_bytes = _fp16_bytes(max_scale / F32(63)), _fp16_bytes(max_min / F32(63))
    step = _fp16_values(d_bytes)[:, None] * sc.astype(F32)  # (n, 8): d * sc_j, the final grid step
    offset = _fp16_values(dmin_bytes)[:, None] * mn.astype(F32)  # (n, 8): dmin * m_j
    sub = sub.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        final = round_clamp((sub + offset[:, :, None]) / step[:, :, None], 0, nmax).astype(np.uint8)
    codes = np.where((step == 0)[:, :, None], codes.reshape(n, 8, 32), final)  # C keeps the search's codes there
    return d_bytes, dmin_bytes, pack_scales_mins(sc, mn), codes.reshape(n, QK_K)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 256) codes -> (n, 128): 64 values per 32 bytes, the first 32 in the low nibbles, the next 32 high."""
    pairs = (codes & 0xF).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) -> (n, 256) uint8 in 0..15."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, QK_K)


def _quantize_rows(weight: np.ndarray, fmt: str, quantize_blocks) -> np.ndarray:  # noqa: ANN001
    blocks = weight.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[fmt]), dtype=np.uint8)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):  # chunks of many blocks, to bound temporary memory
        out[start:start + CHUNK_BLOCKS] = quantize_blocks(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(weight.shape[0], -1)


def quantize_q4_k(weight: np.ndarray | torch.Tensor, search: bool = True) -> np.ndarray:
    """Q4_K bytes, uint8 (rows, cols / 256 * 144), of a float weight (rows, cols); cols a multiple of 256.

    search=False: plain min/max round to nearest in the same layout. Raises LlmkitError for a weight that is not
    2-D floating point, whose cols is not a multiple of 256, or that holds NaN/inf."""
    def blocks(values: np.ndarray) -> np.ndarray:
        d, dmin, scales, codes = _quantize_min_blocks(values, 15, -1.0, 20, search)
        return np.concatenate([d, dmin, scales, _pack_nibbles(codes)], axis=1)
    return _quantize_rows(_weight_matrix(weight, "q4_k"), "q4_k", blocks)


def quantize_q5_k(weight: np.ndarray | torch.Tensor, search: bool = True) -> np.ndarray:
    """Q5_K bytes, uint8 (rows, cols / 256 * 176), of a float weight (rows, cols); as `quantize_q4_k`."""
    def blocks(values: np.ndarray) -> np.ndarray:
        d, dmin, scales, codes = _quantize_min_blocks(values, 31, -0.5, 15, search)
        return np.concatenate([d, dmin, scales, q5_k_body(codes)], axis=1)
    return _quantize_rows(_weight_matrix(weight, "q5_k"), "q5_k", blocks)


def _dequantize_min_blocks(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: (d * sc_j) * q - (dmin * m_j) in float32, as ggml computes it."""
    step, offset = min_block_steps(blocks[:, :16])  # (n, 8) each
    step, offset = step[:, :, None], offset[:, :, None]
    return (step * codes.reshape(-1, 8, 32).astype(F32) - offset).reshape(-1, QK_K)


def dequantize_q4_k(data: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, cols) of Q4_K bytes (as `quantize_q4_k` or a GGUF file stores them)."""
    blocks = _packed_blocks(data, shape, "q4_k")
    return _dequantize_min_blocks(blocks, q4_k_codes(blocks)).reshape(shape)


def dequantize_q5_k(data: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, cols) of Q5_K bytes."""
    blocks = _packed_blocks(data, shape, "q5_k")
    return _dequantize_min_blocks(blocks, q5_k_codes(blocks)).reshape(shape)



# --- the codes and scales of Q4_K/Q5_K blocks on their own (quant/affine.py: the int4 kernel's view of them)


def min_block_steps(header: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) header bytes (d, dmin, 12 scale bytes) of Q4_K/Q5_K blocks -> (d * sc_j, dmin * m_j), float32 (n, 8):
    the products ggml computes, so w_hat = step * q - offset per 32-value sub-block j."""
    d, dmin = _fp16_values(header[:, 0:2]), _fp16_values(header[:, 2:4])
    sc, mins = unpack_scales_mins(header[:, 4:16])
    return d[:, None] * sc.astype(F32), dmin[:, None] * mins.astype(F32)


def q4_k_codes(blocks: np.ndarray) -> np.ndarray:
    """(n, 144) Q4_K blocks -> codes (n, 256) uint8 0..15."""
    return _unpack_nibbles(blocks[:, 16:])


def q4_k_body(codes: np.ndarray) -> np.ndarray:
    """Inverse of `q4_k_codes` for the bytes after the header: (n, 256) -> qs (n, 128)."""
    return _pack_nibbles(codes)


def q5_k_codes(blocks: np.ndarray) -> np.ndarray:
    """(n, 176) Q5_K blocks -> codes (n, 256) uint8 0..31."""
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8)[None, :, None]  # (n, 8, 32)
    return _unpack_nibbles(blocks[:, 48:]) | ((qh & 1) << 4).reshape(-1, QK_K)


def q5_k_body(codes: np.ndarray) -> np.ndarray:
    """Inverse of `q5_k_codes` for the bytes after the header: (n, 256) -> qh (n, 32) | qs (n, 128)."""
    high = ((codes >> 4) & 1).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1).astype(np.uint8)  # (n, 32): bit j = high bit of sub-block j
    return np.concatenate([qh, _pack_nibbles(codes)], axis=1)


# --- Q6_K: 16 sub-blocks of 16, int8 scales


def _q6_k_blocks(values: np.ndarray, search: bool) -> np.ndarray:
    n = values.shape[0]
    sub = values.reshape(n * 16, 16)
    scales, codes = symmetric_scale_search(sub, 32, search)
    scales, codes = scales.reshape(n, 16), codes.reshape(n, 16, 16)
    rows = np.arange(n)
    max_scale = scales[rows, np.abs(scales).argmax(axis=1)]  # signed scale of largest magnitude, first on ties
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # C writes an all-zero block
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = F32(-128) / np.where(zero, F32(1), max_scale)
        sc = np.minimum(np.rint(inverse[:, None] * scales), 127).astype(np.int8)
        d_bytes = _fp16_bytes(F32(1) / inverse)
        step = _fp16_values(d_bytes)[:, None] * sc.astype(F32)  # (n, 16)
        final = (round_clamp(sub.reshape(n, 16, 16) / step[:, :, None], -32, 31) + 32).astype(np.uint8)
    codes = np.where((step == 0)[:, :, None], codes, final).reshape(n, 2, 4, 32)  # (block, half, quarter, value)
    low, high = codes & 0xF, codes >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0
    return out


def quantize_q6_k(weight: np.ndarray | torch.Tensor, search: bool = True) -> np.ndarray:
    """Q6_K bytes, uint8 (rows, cols / 256 * 210), of a float weight (rows, cols); as `quantize_q4_k`, search=False
    giving plain absmax round to nearest."""
    return _quantize_rows(_weight_matrix(weight, "q6_k"), "q6_k", lambda values: _q6_k_blocks(values, search))


def dequantize_q6_k(data: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, cols) of Q6_K bytes: (d * sc_j) * (q - 32), as ggml computes it."""
    blocks = _packed_blocks(data, shape, "q6_k")
    ql, qh = blocks[:, :128].reshape(-1, 2, 1, 2, 32), blocks[:, 128:192].reshape(-1, 2, 1, 32)
    low = (ql >> np.array([0, 4], dtype=np.uint8)[None, None, :, None, None]) & 0xF  # (n, half, nibble, byte half, 32)
    low = low.reshape(-1, 2, 4, 32)  # quarter k = 2 * nibble + byte half: ql[l] low, ql[32+l] low, ql[l] high, ...
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3  # (n, half, quarter, 32)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(F32).reshape(-1, 16, 16)
    step = _fp16_values(blocks[:, 208:210])[:, None] * blocks[:, 192:208].view(np.int8).astype(F32)  # (n, 16)
    return (step[:, :, None] * q).reshape(shape)


QUANTIZE = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
DEQUANTIZE = {"q4_k": dequantize_q4_k, "q5_k": dequantize_q5_k, "q6_k": dequantize_q6_k}


def pack_gguf(weight: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(rows, in) float32 -> (rows, bytes) uint8 blocks of GGUF type `qtype` as llama.cpp writes them: the K-quants
    here (the `gguf` package cannot write them), every other type by gguf.quants.quantize. The `pack` that
    llmkit.checkpoints.export_gguf takes."""
    name = qtype.name.lower()
    if name in QUANTIZE:
        return QUANTIZE[name](weight)
    return gguf_quants.quantize(weight, qtype)
