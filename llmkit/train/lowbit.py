"""Block-wise quantization of optimizer states: 8-bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization") and 4-bit (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States").

A state tensor x is cut into blocks of B values; each block keeps one float32 scale s = max|x| over the block and
one code per value, the index of the map value nearest to x / s:

    code_i = argmin_j |x_i / s - map_j|          x_i ~ s * map[code_i]

The map decides where precision goes. Adam's moments span many orders of magnitude inside a block, so a linear map
would round most of them to 0. The *dynamic* map (dynamic tree quantization) spends bits like a float: after the
sign bit, the number of leading zero bits e gives a decade 10^-e, the first 1 bit ends it, and the remaining bits
are a linear fraction inside [0.1, 1] of that decade, so small magnitudes keep relative precision:

    magnitudes = { 10^-e * midpoints(linspace(0.1, 1, 2^f + 1))  :  e = 0 .. E-1,  f = bits_left - 1 - e }

8 bits: signed (first moment) 127 magnitudes x 2 signs + {0, 1}; unsigned (second moment) 255 magnitudes + {0}.
4 bits: the first moment uses the signed dynamic map (16 values); the second moment uses a linear map *without
zero* (1/16, 2/16, ..., 1), because a second moment rounded to 0 makes Adam's step m / (sqrt(v) + eps) explode
(Li et al.'s "zero-point problem"). 4-bit codes are packed two per byte.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError

BLOCK_8BIT = 2048  # Dettmers et al.: blocks of 2,048 values
BLOCK_4BIT = 128  # Li et al.: B128 for both moments


@functools.cache
def dynamic_map(bits: int, signed: bool) -> torch.Tensor:
    """The sorted dynamic-tree map with 2^bits values in [-1, 1] (signed) or [0, 1] (unsigned)."""
    magnitude_bits = bits - 1 if signed else bits
    values = [0.0]
    for exponent in range(magnitude_bits):
        fraction_bits = magnitude_bits - 1 - exponent
        edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=torch.float64)
        middles = (edges[:-1] + edges[1:]) / 2 * 10.0**-exponent
        values += middles.tolist() + ([-v for v in middles.tolist()] if signed else [])
    if signed:
        values.append(1.0)  # the block's largest value is exact (its own scale)
    result = torch.tensor(sorted(values), dtype=torch.float32)
    if result.numel() != 2**bits:
        raise AssertionError(f"dynamic map of {bits} bits has {result.numel()} values")
    return result


@functools.cache
def linear_map_without_zero(bits: int) -> torch.Tensor:
    """(1/2^bits, 2/2^bits, ..., 1): the 4-bit second-moment map; no value rounds to 0."""
    return torch.arange(1, 2**bits + 1, dtype=torch.float32) / 2**bits


@dataclass(frozen=True)
class QuantSpec:
    """How one state is stored: bits (8 or 4), block size and the map's name ('dynamic_signed', 'dynamic', 'linear')."""

    bits: int
    block: int
    map_name: str

    def values(self) -> torch.Tensor:
        if self.map_name == "linear":
            return linear_map_without_zero(self.bits)
        return dynamic_map(self.bits, signed=self.map_name == "dynamic_signed")


FIRST_MOMENT = {8: QuantSpec(8, BLOCK_8BIT, "dynamic_signed"), 4: QuantSpec(4, BLOCK_4BIT, "dynamic_signed")}
SECOND_MOMENT = {8: QuantSpec(8, BLOCK_8BIT, "dynamic"), 4: QuantSpec(4, BLOCK_4BIT, "linear")}


def quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, scales float32 (n_blocks,)) of a float tensor; 4-bit codes are packed two per byte."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // spec.block)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * spec.block - n)).view(n_blocks, spec.block)  # (blocks, B)
    scales = padded.abs().amax(dim=1)  # (blocks,)
    normalized = padded / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    values = spec.values().to(x.device)
    boundaries = (values[1:] + values[:-1]) / 2  # nearest map value = count of boundaries below
    codes = torch.bucketize(normalized.reshape(-1)[:n], boundaries, out_int32=True).to(torch.uint8)
    if spec.bits == 4:
        codes = _pack4(codes)
    return codes, scales


def zero_state(n: int, spec: QuantSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of n zeros, made directly (quantizing a float tensor of zeros would cost 10x its size in
    temporaries): every scale is 0, so any code decodes to 0; the code of 0.0 where the map has it."""
    zero_code = int((spec.values() == 0).nonzero()[0]) if (spec.values() == 0).any() else 0
    n_codes = -(-n // 2) if spec.bits == 4 else n
    byte = zero_code | (zero_code << 4) if spec.bits == 4 else zero_code
    codes = torch.full((n_codes,), byte, dtype=torch.uint8, device=device)
    return codes, torch.zeros(-(-n // spec.block), device=device)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    """The float32 tensor of `shape` that `quantize` encoded."""
    n = shape.numel()
    if spec.bits == 4:
        codes = _unpack4(codes, n)
    values = spec.values().to(codes.device)[codes.int()]  # (n,)
    blocks = -(-n // spec.block)
    padded = torch.nn.functional.pad(values, (0, blocks * spec.block - n)).view(blocks, spec.block)
    return (padded * scales[:, None]).reshape(-1)[:n].view(shape)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (low, high) nibbles of consecutive values."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if codes.numel() < n:
        raise LlmkitError(f"4-bit optimizer state holds {codes.numel()} codes for {n} values; the checkpoint does not "
                          "match the model")
    return codes[:n]
