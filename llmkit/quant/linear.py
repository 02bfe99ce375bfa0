"""`QuantLinear`: a frozen linear layer y = x W_hat^T + b whose weight stays packed (buffers of a `QuantizedWeight`).

Kernel paths, chosen per call by format, device and row count. Measured on this machine (CPU, 2 threads, SmolLM2-135M
shapes, ms per call, best of 5; the machine was shared, load average 1.5-2.5, so the figures are indicative;
benchmarks/quant_linear.py reproduces the columns). "aten" = torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu:

    out x in     rows  fp32   int8: dequant  aten fp32 x  aten bf16 x   int4 g32: dequant  aten fp32 x  aten bf16 x
    576 x 576      1   0.012         0.066        0.11        0.011                 0.98         0.32        0.014
    1536 x 576     1   0.037         0.27         0.28        0.026                 2.4          0.76        0.037
    576 x 1536     1   0.032         0.27         0.28        0.024                 0.63         0.84          -
    49152 x 576    1   8.6          80           10.2         1.4                 197           27         5 - 15
    576 x 576    512   1.06          2.06        51           2.3                   2.2        146             -
    1536 x 576   512   2.8           3.0        140           6.3                   3.7        388             -

So: few rows (decode, <= KERNEL_MAX_ROWS; 16 is a guess between the measured 1 and 512) on CPU -> the aten
weight-only kernels with bf16 activations
(`torch._weight_int8pack_mm` for int8, `aten._weight_int4pack_mm_for_cpu` for int4, int4_asym, q4_0 and q4_1, whose
w = (u - 8) s + z covers all four with z = (8 - zero) s, 0, and m + 8 d); their fp32-activation variants are 5-30x
slower than fp32 here. Many rows (prefill, scoring) -> dequantize to the activations' dtype and one F.linear, the
fastest there. q8_0 has per-block scales, which `_weight_int8pack_mm` (one scale per output row) cannot take in one
call, so few-row q8_0 calls run it once per block column b: y = sum_b x_b Q_b^T diag(d_b), where Q_b (out, 32) holds
the codes of block b of every row (kept in that layout, "int8blocks"). Measured for the 49152 x 576 head of SmolLM2
(1 row, machine shared): fp32 F.linear 12.5 ms, one int8pack call 8.0, 18 per-block calls 3.4, dequantize + F.linear
111; for 576 x 576 the 18 calls cost ~0.16 ms against ~0.03 ms fp32 (Python call overhead: a fused kernel's job).
nf4 has no aten kernel (a code book): always dequantize-then-F.linear, as do the GGUF-only formats (gguf_types.py).
A `torch.compile`d dequantize-matmul was not measured in this slice.
Decode through the bf16 kernels rounds x, the scales and y to bf16: |y - y_ref| <= 2^-8 (|x| |W_hat|^T) + 2^-8 |y|
(tests/test_quant_linear.py holds it to that).

The int4 kernels read the weight in tinygemm's layout: rows in tiles of 64, byte [tile, k, j] = code (64 tile + j, k)
| code (64 tile + 32 + j, k) << 4 (equal to aten._convert_weight_to_int4pack_for_cpu, tested); the layer keeps the
codes only in that layout (plus the format's own scales), so memory stays ~4 bits + scales per weight, and rebuilds
the format's canonical tensors when asked (`packed`, saving).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.quant import gguf_blocks
from llmkit.quant.formats import get_format
from llmkit.quant.integer import int4_codes_scale_zero
from llmkit.quant.packed import QuantizedWeight, pack_nibbles

KERNEL_MAX_ROWS = 16  # rows per call up to which the aten weight-only kernels are used (decode steps)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
TILE = 64  # output rows per tile of the tinygemm int4 layout
INT4_FAMILY = ("int4", "int4_asym", "q4_0", "q4_1")


def to_tinygemm(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes 0..15, out % 64 == 0 -> (out, in / 2) uint8 in aten's CPU int4pack layout."""
    out_features, in_features = codes.shape
    tiles = codes.to(torch.uint8).view(out_features // TILE, 2, TILE // 2, in_features)  # (tiles, half, j, in)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).transpose(1, 2).contiguous().view(out_features, in_features // 2)


def from_tinygemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tinygemm`: (out, in / 2) uint8 -> (out, in) uint8 codes."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    tiles = packed.view(out_features // TILE, in_features, TILE // 2).transpose(1, 2)  # (tiles, j, in)
    return torch.stack([tiles & 0xF, tiles >> 4], dim=1).reshape(out_features, in_features)


def tinygemm_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Codes (len(rows), in) uint8 of the given output rows of a weight in tinygemm layout, without unpacking the
    rest: row r sits in tile r // 64, column j = r % 32 of it, low nibble for r % 64 < 32 and high nibble otherwise."""
    in_features = packed.shape[1] * 2
    tiles = packed.view(-1, in_features, TILE // 2)  # (tiles, in, j)
    picked = tiles[rows // TILE, :, rows % (TILE // 2)]  # (n, in)
    shift = ((rows % TILE) // (TILE // 2) * 4).to(torch.uint8)[:, None]
    return (picked >> shift) & 0xF


def q8_0_join(d: torch.Tensor, codes: torch.Tensor) -> QuantizedWeight:
    """The canonical q8_0 QuantizedWeight (GGUF block bytes) from scales d fp16 (out, n_blocks) and int8 codes
    (out, n_blocks, 32)."""
    out_features, n_blocks = d.shape
    raw = torch.cat([d[..., None].view(torch.uint8), codes.contiguous().view(torch.uint8)], dim=-1)
    blocks = raw.reshape(out_features, n_blocks * gguf_blocks.BLOCK_BYTES["q8_0"])
    return QuantizedWeight("q8_0", (out_features, n_blocks * gguf_blocks.BLOCK), gguf_blocks.BLOCK, {"blocks": blocks})


def int4_split(packed: QuantizedWeight) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), the format's scale tensors, kernel scale s and offset z, both fp32 (out, in / g), with
    w_hat = (code - 8) s + z) of an int4-family weight."""
    if packed.scheme in ("int4", "int4_asym"):
        codes, scale, zero = int4_codes_scale_zero(packed)
        extras = {k: v for k, v in packed.tensors.items() if k != "codes"}
        return codes, extras, scale, (8 - zero) * scale
    d, codes, m = gguf_blocks.block_fields(packed)
    raw = packed.tensors["blocks"].view(*d.shape, gguf_blocks.BLOCK_BYTES[packed.scheme])
    extras = {"d": raw[..., :2].contiguous().view(torch.float16).squeeze(-1)}  # (out, n_blocks) fp16, exact
    if m is None:
        return codes.reshape(packed.shape), extras, d, torch.zeros_like(d)
    extras["m"] = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    return codes.reshape(packed.shape), extras, d, m + 8 * d


def int4_join(scheme: str, shape: tuple[int, int], group_size: int, codes: torch.Tensor,
              extras: dict[str, torch.Tensor]) -> QuantizedWeight:
    """Inverse of `int4_split`: the format's canonical QuantizedWeight from codes (out, in) and its scale tensors."""
    if scheme in ("int4", "int4_asym"):
        return QuantizedWeight(scheme, shape, group_size, {"codes": pack_nibbles(codes), **extras})
    blocks = codes.view(shape[0], -1, gguf_blocks.BLOCK)
    parts = [extras["d"][..., None].view(torch.uint8)]
    if "m" in extras:
        parts.append(extras["m"][..., None].view(torch.uint8))
    parts.append(blocks[..., :16] | (blocks[..., 16:] << 4))
    return QuantizedWeight(scheme, shape, group_size, {"blocks": torch.cat(parts, dim=-1).reshape(shape[0], -1)})


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`tensor`, copied when its data is not 64-byte aligned and contiguous: safetensors hands out tensors at any
    offset of the file, and aten's int8 weight-only kernel segfaulted here on such a weight."""
    if tensor.is_contiguous() and tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.contiguous().clone()


def kernel_for(packed: QuantizedWeight) -> str:
    """"int8pack", "int8blocks", "int4pack" or "dequantize": the path a layer of this format and shape takes for few
    rows."""
    if packed.scheme == "int8":
        return "int8pack"
    if packed.scheme == "q8_0":
        return "int8blocks"
    if packed.scheme in INT4_FAMILY and packed.shape[0] % TILE == 0 and packed.group_size in INT4_KERNEL_GROUPS:
        return "int4pack"
    return "dequantize"


class QuantLinear(nn.Module):
    """Frozen y = x W_hat^T + b with W held packed. Buffers `weight_<name>` are the format's tensors (int4pack: the
    codes in tinygemm layout as `weight_int4pack`); `bias` a frozen parameter."""

    def __init__(self, packed: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        packed = QuantizedWeight(packed.scheme, packed.shape, packed.group_size,
                                 {name: aligned(t) for name, t in packed.tensors.items()})
        self.scheme, self.group_size = packed.scheme, packed.group_size
        self.out_features, self.in_features = packed.shape
        self.kernel = kernel_for(packed)
        if self.kernel == "int8blocks":
            d, codes, _ = gguf_blocks.block_fields(packed)  # (out, n_blocks) fp32 of fp16, (out, n_blocks, 32) int8
            self.register_buffer("weight_q8blocks", codes.transpose(0, 1).contiguous())  # (n_blocks, out, 32)
            self.register_buffer("weight_d", d.to(torch.float16))  # (out, n_blocks), exact: d was fp16
            self._extras = ("d",)
            self.register_buffer("kernel_scales", d.t().contiguous().to(torch.bfloat16), persistent=False)
        elif self.kernel == "int4pack":
            codes, extras, scale, offset = int4_split(packed)
            self.register_buffer("weight_int4pack", to_tinygemm(codes))
            for name, tensor in extras.items():
                self.register_buffer(f"weight_{name}", tensor)
            self._extras = tuple(extras)
            # (in / g, out, 2): scale and offset per group as the kernel reads them, in bf16 (derived, not saved)
            self.register_buffer("kernel_scales", torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16),
                                 persistent=False)
        else:
            for name, tensor in packed.tensors.items():
                self.register_buffer(f"weight_{name}", tensor)
            self._extras = tuple(packed.tensors)
            if self.kernel == "int8pack":
                self.register_buffer("kernel_scales", packed.tensors["scale"].to(torch.bfloat16), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None) -> QuantLinear:
        """The quantized version of an nn.Linear (bias kept in its dtype, frozen)."""
        module = cls(get_format(scheme).quantize(linear.weight, group_size), linear.bias)
        return module.to(linear.weight.device)

    @property
    def packed(self) -> QuantizedWeight:
        """The weight in its format's canonical tensors (what a checkpoint stores)."""
        shape = (self.out_features, self.in_features)
        extras = {name: getattr(self, f"weight_{name}") for name in self._extras}
        if self.kernel == "int4pack":
            return int4_join(self.scheme, shape, self.group_size, from_tinygemm(self.weight_int4pack), extras)
        if self.kernel == "int8blocks":
            return q8_0_join(self.weight_d, self.weight_q8blocks.transpose(0, 1))
        return QuantizedWeight(self.scheme, shape, self.group_size, extras)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kernel == "int8blocks":  # d q in fp32, as dequantize_blocks, without rebuilding the bytes
            w = self.weight_q8blocks.float() * self.weight_d.t().float()[..., None]  # (n_blocks, out, 32)
            return w.transpose(0, 1).reshape(self.out_features, self.in_features).to(dtype)
        return get_format(self.scheme).dequantize(self.packed, dtype)  # (out, in)

    def dequantized_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat[rows] (len(rows), in), dequantizing only those rows (blocks run along a row, so a row's packed
        bytes are the row alone): what an embedding lookup into a quantized table needs. Equal to
        dequantized_weight()[rows]."""
        rows = rows.reshape(-1)
        if self.kernel == "int8blocks":
            w = self.weight_q8blocks[:, rows].float() * self.weight_d[rows].t().float()[..., None]  # (nb, n, 32)
            return w.transpose(0, 1).reshape(len(rows), self.in_features).to(dtype)
        shape = (len(rows), self.in_features)
        extras = {name: getattr(self, f"weight_{name}")[rows] for name in self._extras}
        if self.kernel == "int4pack":
            codes = tinygemm_rows(self.weight_int4pack, rows)
            packed = int4_join(self.scheme, shape, self.group_size, codes, extras)
        elif self.scheme == "nf4":  # blocks and double-quantized scales run over the flattened weight
            return self.dequantized_weight(dtype)[rows]
        else:  # every other format stores one row of packed values (and scales) per output row
            packed = QuantizedWeight(self.scheme, shape, self.group_size, extras)
        return get_format(self.scheme).dequantize(packed, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        fast = (self.kernel != "dequantize" and rows <= KERNEL_MAX_ROWS and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad))
        if not fast:
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(flat, self.weight_qweight, self.kernel_scales)
        elif self.kernel == "int8blocks":
            blocks = flat.view(rows, -1, gguf_blocks.BLOCK)  # (rows, n_blocks, 32)
            y = torch.zeros(rows, self.out_features)
            for b in range(blocks.shape[1]):  # fp32 sum of the per-block products
                y += torch._weight_int8pack_mm(blocks[:, b], self.weight_q8blocks[b], self.kernel_scales[b])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4pack, self.group_size,
                                                           self.kernel_scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        # model.to(dtype) must not cast packed scales (fp32/fp16/bf16 by format): buffers only change device.
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None}
        module = super()._apply(fn, recurse)
        for name, before in saved.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, group_size={self.group_size}, kernel={self.kernel}")

