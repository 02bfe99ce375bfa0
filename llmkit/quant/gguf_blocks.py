"""GGUF block formats Q8_0, Q4_0 and Q4_1, byte for byte as llama.cpp writes them (ggml-quants.c,
quantize_row_q8_0_ref / q4_0_ref / q4_1_ref; the `gguf` package's gguf.quants mirrors them in numpy). Each row of a
weight (out, in) is cut into blocks of 32 consecutive inputs (in_features must be a multiple of 32); each block is
stored as a fp16 scale (and minimum) followed by its codes, and a row is its blocks back to back:

    Q8_0  34 bytes = d (fp16) | 32 x int8 q       d = absmax / 127, q = roundf(w / d)  (half away from 0)
          w_hat = d16 q                           |w - w_hat| <= d/2 + 127 |d16 - d| <= d (1/2 + 127 * 2^-11)
    Q4_0  18 bytes = d (fp16) | 16 bytes          d = v / -8 for v the value of largest |v| (first on ties),
          q = min(trunc(w / d + 8.5), 15), w_hat = d16 (q - 8);  byte j holds q_j (low nibble) and q_(j+16) (high)
          |w - w_hat| <= |d| / 2 + 8 |d16 - d| except on the side opposite v, where w / d in (7.5, 8] is clipped
          to 15: there the error reaches |d|. So |w - w_hat| <= |d| (1 + 8 * 2^-11).
    Q4_1  20 bytes = d (fp16) | m (fp16) | 16 bytes   m = min, d = (max - min) / 15,
          q = min(trunc((w - m) / d + 0.5), 15), w_hat = d16 q + m16
          |w - w_hat| <= d / 2 + 15 |d16 - d| + |m16 - m| <= d (1/2 + 15 * 2^-11) + |m| 2^-11
4.5 / 5 / 8.5 bits per weight (Q4_0 / Q4_1 / Q8_0). fp32 arithmetic here is the same IEEE operations as the
reference, so the bytes are equal, not close (tests/test_quant_formats.py compares them with gguf.quants).
(The fp16 rounding bounds hold while the scale is a normal fp16 number, |d| >= 2^-14.)
tensors: blocks uint8 (out, in / 32 * bytes per block).
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.quant.packed import QuantizedWeight, check_weight

BLOCK = 32  # weights per block in all three formats (QK8_0 = QK4_0 = QK4_1 = 32)
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2, "q4_1": 4 + BLOCK // 2}


def _blocks(weight: torch.Tensor, scheme: str, group_size: int | None) -> torch.Tensor:
    """The weight as fp32 blocks (out, in / 32, 32), after the shared checks."""
    if group_size not in (None, BLOCK):
        raise LlmkitError(f"{scheme} has a fixed block of {BLOCK} weights: --group_size {group_size} does not apply; "
                          "leave it out")
    w = check_weight(weight, scheme)
    if w.shape[1] % BLOCK:
        raise LlmkitError(f"{scheme} needs in_features divisible by {BLOCK} (its block size); this weight has "
                          f"{w.shape[1]}: use int8 or nf4 for it")
    return w.view(w.shape[0], -1, BLOCK)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)  # id = d ? 1/d : 0, as ggml


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero) exactly as gguf.quants.np_roundf computes it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) fp32 -> (..., 2) the little-endian bytes of its fp16 rounding."""
    return x.to(torch.float16).view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) codes -> (..., 16) bytes: q_j in the low nibble, q_(j+16) in the high one."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _denibble(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)  # (..., 16) -> (..., 32)


def _packed(scheme: str, w_blocks: torch.Tensor, parts: list[torch.Tensor]) -> QuantizedWeight:
    out_features, n_blocks, _ = w_blocks.shape
    data = torch.cat(parts, dim=-1).reshape(out_features, n_blocks * BLOCK_BYTES[scheme])
    return QuantizedWeight(scheme, (out_features, n_blocks * BLOCK), BLOCK, {"blocks": data})


def quantize_q8_0(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    b = _blocks(weight, "q8_0", group_size)
    d = b.abs().amax(dim=-1, keepdim=True) / 127  # (out, n_blocks, 1)
    q = _roundf(b * _reciprocal(d)).to(torch.int8).view(torch.uint8)
    return _packed("q8_0", b, [_fp16_bytes(d), q])


def quantize_q4_0(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    b = _blocks(weight, "q4_0", group_size)
    v = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # signed value of largest magnitude (first on ties)
    d = v / -8
    q = torch.trunc(b * _reciprocal(d) + 8.5).clamp(0, 15)
    return _packed("q4_0", b, [_fp16_bytes(d), _nibbles(q)])


def quantize_q4_1(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    b = _blocks(weight, "q4_1", group_size)
    low, high = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    d = (high - low) / 15
    q = torch.trunc((b - low) * _reciprocal(d) + 0.5).clamp(0, 15)
    return _packed("q4_1", b, [_fp16_bytes(d), _fp16_bytes(low), _nibbles(q)])


def block_fields(packed: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d fp32 (out, n_blocks), codes (out, n_blocks, 32): int8 for q8_0 else uint8 0..15, m fp32 or None)."""
    out_features, in_features = packed.shape
    raw = packed.tensors["blocks"].view(out_features, in_features // BLOCK, BLOCK_BYTES[packed.scheme])
    d = raw[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    if packed.scheme == "q8_0":
        return d, raw[..., 2:].contiguous().view(torch.int8), None
    if packed.scheme == "q4_0":
        return d, _denibble(raw[..., 2:]), None
    m = raw[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return d, _denibble(raw[..., 4:]), m


def dequantize_blocks(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_hat (out, in) as gguf.quants.dequantize computes it (fp32 products, then `dtype`)."""
    d, q, m = block_fields(packed)
    q = q.float() - 8 if packed.scheme == "q4_0" else q.float()
    w = d[..., None] * q + (m[..., None] if m is not None else 0)
    return w.view(packed.shape).to(dtype)
