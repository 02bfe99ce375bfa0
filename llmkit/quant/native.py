"""llmkit's own CPU kernels for GGUF's block formats (llmkit/quant/kernels/): a layer keeps the file's block bytes,
byte for byte, and multiplies from them directly.

Three products (the formats' layouts and the math: kernels/gguf_formats.h):

- `gguf_matmul`, int8 activations (gguf_cpu.cpp), for Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K. Every
  format decodes into sub-blocks of 32 values w_j = s_(j/16) q_j + m; each row of x is quantized per block of 32
  to int8 (dx = fp16(max|x| / 127), qx = round(x / dx): llama.cpp's Q8_0 activations), so a sub-block's
  contribution is dx (s_0 sum_(j<16) q_j qx_j + s_1 sum_(j>=16) q_j qx_j) + m dx sum_j qx_j: 32 integer products
  per sub-block and row, one AVX512-VNNI `vpdpbusd` (or AVX2 `vpmaddubsw` + `vpmaddwd`), the weight block decoded
  once for every row of x (up to 16 rows per call, the decode and speculative-verification sizes).
- `x8_matmul` (gguf_x8.cpp), the same products for Q4_0, Q4_1 and Q8_0 from the blocks regrouped 8 output rows at
  a time (`to_x8`; QuantLinear keeps its layers so): one `vpdpbusd` with 4 x codes broadcast adds 4 products to 8
  rows' sums at once, the scales applied as a vector of 8, no horizontal sums (1.8-3x the row kernel's speed on
  hot caches). It takes any number of rows: QuantLinear runs a prompt through it too under inference mode.
- `float_matmul`, float32 activations (float_cpu.cpp), for Q8_0 blocks: the weights are widened to float32 in
  registers, block by block, and multiplied with x as it is, so the result is F.linear of the dequantized weight up
  to the order of the sums. For the LM head (int8 activations there moved SmolLM2's logits enough to flip an
  answer). F16/BF16 matrices take llmkit.nn.decode_kernels.linear, kept column-major (QuantLinear).
- `dequantize` / `dequantize_x8` (dequantize_cpu.cpp) widen a whole matrix (or the rows an embedding looks up) to
  float32 with the values gguf.quants.dequantize gives, bit for bit: a prompt's many rows take one float32 GEMM with
  that matrix (QuantLinear.dequantize_forward). In torch ops (nibble masks, shifts, the regrouping undone, several
  temporaries per matrix) that cost ~0.4 s of a 512-token SmolLM2 Q4_0 prefill of ~1.6 s; in C++ it is one pass.

Against aten's int4 kernel (quant/tinygemm.py), which these formats took before: no split of 5- and 8-bit codes into
two 4-bit halves, no bf16 scale/offset copies (RAM = the file's bytes), Q6_K no longer dequantized per call, and
activations rounded as llama.cpp rounds them. Measured in docs/quantization.md.

The C++ sources are compiled on first use with the machine's C++ compiler (`torch.utils.cpp_extension.load`,
`-O3 -march=native -fopenmp`: at::parallel_for is OpenMP pragmas in a header, so without the flag the kernels ran
on one thread; ~30 s once, cached by torch under ~/.cache/torch_extensions). Where that fails (no compiler)
the formats fall back to aten's kernels or dequantize per call, with a one-line warning; LLMKIT_NATIVE_KERNELS=0
asks for that fallback.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from llmkit.extensions import FLAGS, build_ops, try_build_ops

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / "gguf_cpu.cpp", KERNELS / "float_cpu.cpp", KERNELS / "gguf_x8.cpp", KERNELS / "dequantize_cpu.cpp"]
HEADERS = [KERNELS / "gguf_formats.h", KERNELS / "activations.h"]
# the kernels' `kind` arguments per scheme (the order of the Kind enums in the C++ files)
INT8_KINDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q5_0": 3, "q5_1": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7}
SCHEMES = list(INT8_KINDS)  # the scheme of each kind
# (values, bytes) per block of each format (gguf_formats.h)
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34), "q5_0": (32, 22), "q5_1": (32, 24),
          "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
FLOAT_SCHEMES = ("q8_0",)  # formats with a float32-activation kernel (float_cpu.cpp)
X8_SCHEMES = ("q4_0", "q4_1", "q8_0")  # formats the 8-row kernel (gguf_x8.cpp) runs, in `to_x8`'s layout
GROUP = 8  # output rows per group in that layout
X8_BLOCK_BYTES = {scheme: BLOCKS[scheme][1] for scheme in X8_SCHEMES}  # bytes per block of 32 in the file
X8_FIELDS = {"q4_0": (2,), "q4_1": (2, 2), "q8_0": (2,)}  # header bytes before the codes: d (Q4_1: and m)
MAX_ROWS = 16  # rows of x per call (the kernels' kMaxRows; the 8-row kernel takes any number)
OPS = "llmkit_gguf"  # the torch op namespace


def build(flags: list[str] = FLAGS, ops: str = OPS) -> None:
    """Compile and load the kernels with these compiler flags as the torch ops `ops`::matmul / ::matmul_float /
    ::matmul_x8 / ::dequantize / ::dequantize_x8 (the tests build other instruction sets under other names); raises
    what the build raises."""
    build_ops(ops, SOURCES, HEADERS, flags, what="GGUF CPU kernels")
    register_fakes(ops)


def register_fakes(ops: str) -> None:
    """The ops' output shapes for torch.compile's fake tensors."""

    @torch.library.register_fake(f"{ops}::matmul")
    def _(x: torch.Tensor, blocks: torch.Tensor, kind: int, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake(f"{ops}::matmul_float")
    def _(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake(f"{ops}::matmul_x8")
    def _(x: torch.Tensor, blocks: torch.Tensor, kind: int, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake(f"{ops}::dequantize")
    def _(blocks: torch.Tensor, kind: int, out_features: int) -> torch.Tensor:
        values, size = BLOCKS[SCHEMES[kind]]
        return blocks.new_empty(out_features, blocks.shape[1] // size * values, dtype=torch.float32)

    @torch.library.register_fake(f"{ops}::dequantize_x8")
    def _(blocks: torch.Tensor, kind: int, out_features: int) -> torch.Tensor:
        per_block = GROUP * X8_BLOCK_BYTES[SCHEMES[kind]]
        return blocks.new_empty(out_features, blocks.shape[1] // per_block * 32, dtype=torch.float32)


@functools.cache
def native_kernels_available() -> bool:
    """Whether the GGUF block kernels are built and loaded (building them on the first call)."""
    if not try_build_ops(OPS, SOURCES, HEADERS, what="GGUF CPU kernels",
                         fallback="GGUF layers use aten's kernels or dequantize per call"):
        return False
    register_fakes(OPS)
    return True


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, scheme: str, out_features: int, ops: str = OPS) -> torch.Tensor:
    """y (..., out_features) = x (..., in) W^T, float32, for W in `scheme`'s GGUF blocks (out_features, bytes per
    row) uint8, x rounded to int8 per block of 32; at most MAX_ROWS rows."""
    return getattr(torch.ops, ops).matmul(x, blocks, INT8_KINDS[scheme], out_features)


def float_matmul(x: torch.Tensor, blocks: torch.Tensor, out_features: int, ops: str = OPS) -> torch.Tensor:
    """y (..., out_features) = x (..., in) W^T in float32 for W a Q8_0 block matrix (out_features, bytes per row)
    uint8; at most MAX_ROWS rows."""
    return getattr(torch.ops, ops).matmul_float(x, blocks, out_features)


def x8_matmul(x: torch.Tensor, blocks_x8: torch.Tensor, scheme: str, out_features: int, ops: str = OPS) -> torch.Tensor:
    """`gguf_matmul` from the 8-row layout of `to_x8` (q4_0, q4_1, q8_0): the same products, summed in another
    order."""
    return getattr(torch.ops, ops).matmul_x8(x, blocks_x8, INT8_KINDS[scheme], out_features)


def dequantize(blocks: torch.Tensor, scheme: str, out_features: int, ops: str = OPS) -> torch.Tensor:
    """W (out_features, in) float32 from `scheme`'s GGUF blocks (out_features, bytes per row) uint8: the values
    gguf.quants.dequantize gives, bit for bit (dequantize_cpu.cpp), on torch's threads."""
    return getattr(torch.ops, ops).dequantize(blocks, INT8_KINDS[scheme], out_features)


def dequantize_x8(blocks_x8: torch.Tensor, scheme: str, out_features: int, ops: str = OPS) -> torch.Tensor:
    """`dequantize` from the 8-row layout of `to_x8` (its first out_features rows)."""
    return getattr(torch.ops, ops).dequantize_x8(blocks_x8, INT8_KINDS[scheme], out_features)


def to_x8(blocks: torch.Tensor, scheme: str) -> torch.Tensor:
    """A matrix's GGUF blocks (out, bytes per row) -> the 8-row layout (ceil(out / 8), bytes per row * 8) that
    gguf_x8.cpp reads: per group of 8 rows and block of 32 inputs, each header field of the 8 rows side by side (the
    fp16 scale d; Q4_1: then the minimums m), then their codes interleaved 4 bytes at a
    time (chunk c = each row's code bytes 4c .. 4c + 3). Rows past `out` are zero (scale 0: they add nothing, and
    the kernel drops them). A lossless reordering: `from_x8`."""
    out_features = blocks.shape[0]
    groups = -(-out_features // GROUP)
    padded = blocks.new_zeros(groups * GROUP, blocks.shape[1])
    padded[:out_features] = blocks
    raw = padded.view(groups, GROUP, -1, X8_BLOCK_BYTES[scheme]).transpose(1, 2)  # (groups, n_blocks, 8 rows, bytes)
    parts, at = [], 0
    for size, piece in _x8_fields(scheme):
        field = raw[..., at:at + size].reshape(groups, raw.shape[1], GROUP, size // piece, piece)
        parts.append(field.transpose(2, 3).reshape(groups, raw.shape[1], -1))  # pieces major, then rows
        at += size
    return torch.cat(parts, -1).reshape(groups, -1)


def _x8_fields(scheme: str) -> list[tuple[int, int]]:
    """(bytes, piece) per field of a block: the header fields whole, then the codes in pieces of 4 bytes."""
    header = X8_FIELDS[scheme]
    return [(size, size) for size in header] + [(X8_BLOCK_BYTES[scheme] - sum(header), 4)]


def from_x8(blocks_x8: torch.Tensor, scheme: str, out_features: int) -> torch.Tensor:
    """Inverse of `to_x8`: the file's blocks (out_features, bytes per row) of the groups given (a row gather passes
    only the groups it needs, with out_features = 8 per group)."""
    groups, block_bytes = blocks_x8.shape[0], X8_BLOCK_BYTES[scheme]
    raw = blocks_x8.view(groups, -1, GROUP * block_bytes)  # (groups, n_blocks, 8 * bytes)
    parts, at = [], 0
    for size, piece in _x8_fields(scheme):
        field = raw[..., GROUP * at:GROUP * (at + size)].reshape(groups, raw.shape[1], size // piece, GROUP, piece)
        parts.append(field.transpose(2, 3).reshape(groups, raw.shape[1], GROUP, size))  # (g, nb, 8 rows, size)
        at += size
    rows = torch.cat(parts, -1)  # (g, nb, 8 rows, bytes)
    return rows.transpose(1, 2).reshape(groups * GROUP, -1)[:out_features]
