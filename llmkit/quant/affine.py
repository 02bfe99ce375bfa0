"""The affine block view of a quantized weight: integer codes q (out, in), and per block of `group` consecutive inputs
of a row a step s and an offset z, with

    w_hat = s q + z                                     (s, z fp32 (out, in / group))

Every format with a fast kernel in QuantLinear has this form. For the GGUF block formats the products are the ones
its dequantizer computes, so `AffineBlocks.dequantize` equals it bit for bit (tested against gguf.quants); int4's
(q - zero) scale equals s q + z up to one fp32 rounding.

    scheme           codes            s            z              group    extras kept to rebuild the format's bytes
    int4, int4_asym  0..15            scale        -zero scale    g        scale (and zero)
    q4_0             0..15            d            -8 d           32       d fp16
    q4_1             0..15            d            m              32       d, m fp16
    q8_0             -127..127        d            0              32       d fp16
    q5_0             0..31            d            -16 d          32       d fp16
    q5_1             0..31            d            m              32       d, m fp16
    q4_k             0..15            d sc_j       -dmin m_j      32       the 16 header bytes of each 256-block
    q5_k             0..31            d sc_j       -dmin m_j      32       likewise (d, dmin, 12 scale bytes)

Q4_K is exactly a group-32 4-bit format: per 32-value sub-block j of a super-block, w = (d sc_j) q - (dmin m_j).
Q6_K (16-value sub-blocks) has no view here: aten's int4 kernel takes groups of 32 or more (llmkit's own kernels,
quant/native.py, run it and every format above on the file's bytes where a C++ compiler exists; this view is the
path without one).
`split` gives the view of a QuantizedWeight, `join` the format's canonical QuantizedWeight back from codes + extras.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.quant import gguf_blocks, kquants
from llmkit.quant.integer import int4_codes_scale_zero
from llmkit.quant.packed import QuantizedWeight, pack_nibbles

SUB = 32  # values per block of the GGUF block formats and per K-quant sub-block of Q4_K/Q5_K
Q5_BYTES = {"q5_0": 22, "q5_1": 24}
K_HEADER = 16  # d, dmin (fp16 each) and the 12 packed 6-bit scale/min bytes of a Q4_K/Q5_K super-block
AFFINE_SCHEMES = ("int4", "int4_asym", "q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k")


@dataclass
class AffineBlocks:
    """w_hat = step * codes + offset per block of `group` inputs; `extras` rebuild the format's bytes with the codes."""

    codes: torch.Tensor  # (out, in) int16
    step: torch.Tensor  # (out, in / group) fp32
    offset: torch.Tensor  # (out, in / group) fp32
    group: int
    extras: dict[str, torch.Tensor]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        q = self.codes.float().view(out_features, -1, self.group)  # (out, n_blocks, group)
        w = self.step[..., None] * q + self.offset[..., None]
        return w.view(out_features, in_features).to(dtype)


def _fp16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block (out, n_blocks, bytes) -> (out, n_blocks) fp16."""
    return raw[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def _q5_codes(raw: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1 blocks (out, nb, bytes) -> codes (out, nb, 32) 0..31: value j's low nibble in byte j % 16 of qs
    (low half for j < 16), its fifth bit bit j of the little-endian uint32 qh."""
    qh = raw[..., qh_at:qh_at + 4].contiguous().view(torch.int32)  # (out, nb, 1)
    high = (qh >> torch.arange(SUB, dtype=torch.int32)) & 1  # (out, nb, 32)
    qs = raw[..., qh_at + 4:].to(torch.int16)
    low = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    return low | (high.to(torch.int16) << 4)


def _q5_bytes(codes: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `_q5_codes`: (out, nb, 32) -> [qh (out, nb, 4), qs (out, nb, 16)] uint8."""
    high = ((codes >> 4) & 1).to(torch.int64) << torch.arange(SUB)
    qh = high.sum(-1, keepdim=True).to(torch.int32).view(torch.uint8)  # little-endian uint32
    low = (codes & 0xF).to(torch.uint8)
    return [qh, low[..., :16] | (low[..., 16:] << 4)]


def split(packed: QuantizedWeight) -> AffineBlocks:
    """The affine block view of a weight whose scheme is in AFFINE_SCHEMES."""
    scheme, out_features = packed.scheme, packed.shape[0]
    if scheme in ("int4", "int4_asym"):
        codes, scale, zero = int4_codes_scale_zero(packed)
        extras = {k: v for k, v in packed.tensors.items() if k != "codes"}
        return AffineBlocks(codes.to(torch.int16), scale, -zero * scale, packed.group_size, extras)
    blocks = packed.tensors["blocks"]
    if scheme in gguf_blocks.BLOCK_BYTES:
        d, codes, m = gguf_blocks.block_fields(packed)
        raw = blocks.view(out_features, -1, gguf_blocks.BLOCK_BYTES[scheme])
        extras = {"d": _fp16(raw, 0)}
        offset = torch.zeros_like(d) if scheme == "q8_0" else -8 * d
        if m is not None:
            extras["m"], offset = _fp16(raw, 2), m
        return AffineBlocks(codes.to(torch.int16).reshape(packed.shape), d, offset, SUB, extras)
    if scheme in Q5_BYTES:
        raw = blocks.view(out_features, -1, Q5_BYTES[scheme])
        d = _fp16(raw, 0).float()
        extras = {"d": _fp16(raw, 0)}
        offset = -16 * d
        if scheme == "q5_1":
            extras["m"] = _fp16(raw, 2)
            offset = extras["m"].float()
        codes = _q5_codes(raw, 2 if scheme == "q5_0" else 4)
        return AffineBlocks(codes.reshape(packed.shape), d, offset, SUB, extras)
    raw = blocks.view(out_features, -1, kquants.BLOCK_BYTES[scheme])  # (out, n_superblocks, bytes)
    flat = raw.reshape(-1, kquants.BLOCK_BYTES[scheme]).numpy()  # (out * n_superblocks, bytes)
    step, offset = kquants.min_block_steps(flat[:, :K_HEADER])  # (n, 8) each
    codes = kquants.q4_k_codes(flat) if scheme == "q4_k" else kquants.q5_k_codes(flat)
    return AffineBlocks(torch.from_numpy(codes).to(torch.int16).reshape(packed.shape),
                        torch.from_numpy(step).reshape(out_features, -1), torch.from_numpy(-offset).reshape(
                            out_features, -1), SUB, {"header": raw[..., :K_HEADER].contiguous()})


def join(scheme: str, shape: tuple[int, int], group_size: int | None, codes: torch.Tensor,
         extras: dict[str, torch.Tensor]) -> QuantizedWeight:
    """Inverse of `split`: the format's canonical QuantizedWeight from codes (out, in) and the extras."""
    out_features = shape[0]
    if scheme in ("int4", "int4_asym"):
        return QuantizedWeight(scheme, shape, group_size, {"codes": pack_nibbles(codes.to(torch.uint8)), **extras})
    blocks = codes.view(out_features, -1, SUB)
    if scheme in ("q4_k", "q5_k"):
        flat = blocks.reshape(-1, kquants.QK_K).to(torch.uint8).numpy()
        body = kquants.q4_k_body(flat) if scheme == "q4_k" else kquants.q5_k_body(flat)
        n_super = shape[1] // kquants.QK_K
        body = torch.from_numpy(body).view(out_features, n_super, -1)
        return QuantizedWeight(scheme, shape, group_size,
                               {"blocks": torch.cat([extras["header"], body], dim=-1).reshape(out_features, -1)})
    parts = [extras["d"][..., None].view(torch.uint8)]
    if "m" in extras:
        parts.append(extras["m"][..., None].view(torch.uint8))
    if scheme == "q8_0":
        parts.append(blocks.to(torch.int8).view(torch.uint8))
    elif scheme in Q5_BYTES:
        parts.extend(_q5_bytes(blocks))
    else:  # q4_0, q4_1
        low = blocks.to(torch.uint8)
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return QuantizedWeight(scheme, shape, group_size, {"blocks": torch.cat(parts, dim=-1).reshape(out_features, -1)})


def extras_rows(extras: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extras of the given output rows (every extra holds one row per output row)."""
    return {name: tensor[rows] for name, tensor in extras.items()}
