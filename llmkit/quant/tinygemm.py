"""aten's CPU int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, from tinygemm) fed from an affine block view
(quant/affine.py, w_hat = s q + z per group of inputs), including codes wider than 4 bits.

The kernel computes y = x W^T with W[o, k] = (u[o, k] - 8) s[g, o] + z'[g, o] for 4-bit u and one bf16 pair (s, z')
per group g of 32/64/128/256 inputs. A 4-bit view maps on directly: u = q, z' = z + 8 s.

Wider codes (Q8_0's -127..127, Q5's 0..31) are split into two 4-bit pieces, q = 16 h + l with h = floor(q / 16) in
-8..7 and l = q mod 16 in 0..15, which the kernel takes in ONE call with the input width doubled:

    W' = [W_h | W_l]  (out, 2 in),  x' = [x | x]  (rows, 2 in):   x' W'^T = x (W_h + W_l)^T = x W^T
    W_h: u = h + 8, scale 16 s, offset 0          -> 16 s h
    W_l: u = l,     scale s,    offset 8 s + z    -> s l + z        (sum: s (16 h + l) + z = s q + z)

Exact up to the bf16 rounding of x, of the two scale/offset pairs and of y (the kernel accumulates in fp32): no
weight is dequantized to memory. Cost: 4 bits per code per piece (8 bits for a split weight, what int8 takes) plus 2
bf16 per group and piece. Measured against the alternatives in quant/linear.py's docstring.

Layout: rows in tiles of T, byte [tile, k, j] = u(T tile + j, k) | u(T tile + T/2 + j, k) << 4, where T depends on
the instruction set torch's CPU kernels picked at run time: 64 with AVX-512, 32 with AVX2 (`layout_tile` asks
aten._convert_weight_to_int4pack_for_cpu once; tests hold the packer equal to it). Output rows are padded with zero
codes and zero scales to a multiple of 64 (a whole number of tiles either way), and the padding is cut from y.
"""

from __future__ import annotations

import functools

import torch

from llmkit.quant.affine import AffineBlocks

ROW_PADDING = 64  # output rows are padded to a multiple of this (the largest tile)
KERNEL_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts


@functools.cache
def layout_tile() -> int:
    """Output rows per tile of aten's CPU int4pack layout on this machine (64 where torch runs AVX-512 kernels, 32
    with AVX2), found by packing a probe with aten's own packer; 0 when no known layout matches (then layers do not
    take the int4 kernel: `kernel_for`)."""
    probe = torch.randint(0, 16, (ROW_PADDING, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return next((tile for tile in (64, 32) if torch.equal(_pack(probe.to(torch.uint8), tile), packed)), 0)


def _pack(codes: torch.Tensor, tile: int) -> torch.Tensor:
    out_features, in_features = codes.shape
    tiles = codes.view(out_features // tile, 2, tile // 2, in_features)  # (tiles, half, j, in)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).transpose(1, 2).contiguous().view(out_features, in_features // 2)


def to_tinygemm(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes 0..15, out % 64 == 0 -> (out, in / 2) uint8 in aten's CPU int4pack layout."""
    return _pack(codes.to(torch.uint8), layout_tile())


def from_tinygemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tinygemm`: (out, in / 2) uint8 -> (out, in) uint8 codes."""
    tile = layout_tile()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    tiles = packed.view(out_features // tile, in_features, tile // 2).transpose(1, 2)  # (tiles, j, in)
    return torch.stack([tiles & 0xF, tiles >> 4], dim=1).reshape(out_features, in_features)


def tinygemm_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Codes (len(rows), in) uint8 of the given output rows of a weight in tinygemm layout, without unpacking the
    rest: row r sits in tile r // T, column j = r % (T / 2) of it, low nibble in the tile's first half."""
    tile = layout_tile()
    in_features = packed.shape[1] * 2
    tiles = packed.view(-1, in_features, tile // 2)  # (tiles, in, j)
    picked = tiles[rows // tile, :, rows % (tile // 2)]  # (n, in)
    shift = ((rows % tile) // (tile // 2) * 4).to(torch.uint8)[:, None]
    return (picked >> shift) & 0xF


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == rows else torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0],
                                                                                      *tensor.shape[1:])])


def kernel_weight(view: AffineBlocks, pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in tinygemm layout (out_padded, pieces * in / 2) uint8, scales bf16 (pieces * in / group, out_padded,
    2)) of an affine view, as one 4-bit piece (codes 0..15) or two (module docstring)."""
    out_features = view.codes.shape[0]
    padded = -(-out_features // ROW_PADDING) * ROW_PADDING
    if pieces == 1:
        codes, steps, offsets = view.codes, [view.step], [view.offset + 8 * view.step]
    else:
        high, low = view.codes >> 4, view.codes & 0xF  # floor division and remainder by 16, also for q < 0
        codes = torch.cat([high + 8, low], dim=1)  # (out, 2 in): K = [high pieces | low pieces]
        steps, offsets = [16 * view.step, view.step], [torch.zeros_like(view.step), view.offset + 8 * view.step]
    scales = torch.stack([torch.cat(steps, dim=1), torch.cat(offsets, dim=1)], dim=-1)  # (out, groups, 2)
    packed = to_tinygemm(_pad_rows(codes.to(torch.uint8), padded))
    return packed, _pad_rows(scales, padded).transpose(0, 1).contiguous().to(torch.bfloat16)


def codes_of(kernel_codes: torch.Tensor, pieces: int) -> torch.Tensor:
    """The view's integer codes (n, in) int16 back from 4-bit kernel codes (n, pieces * in) (inverse of the split)."""
    codes = kernel_codes.to(torch.int16)
    if pieces == 1:
        return codes
    high, low = codes.chunk(2, dim=1)
    return (high - 8) * 16 + low


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scales: torch.Tensor, pieces: int,
                out_features: int) -> torch.Tensor:
    """y (rows, out_features) fp32-accumulated, bf16 = x (rows, in) W^T through the kernel; x is cast to bf16."""
    x = x.to(torch.bfloat16)
    if pieces == 2:
        x = torch.cat([x, x], dim=1)  # (rows, 2 in): each piece sees the same inputs
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales)
    return y if y.shape[1] == out_features else y[:, :out_features]
