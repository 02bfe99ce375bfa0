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

Where the int4 kernel stops paying (benchmarks/quant_linear_rows.py: kernel and dequantize + F.linear interleaved,
median of 5 rounds of best-of-3, ms per call; 2026-12-05, 2 threads, load average 2.3 and rising, so indicative):

    q4_1   rows    576 x 576       192 x 576       1536 x 576      576 x 1536     (kernel / dequantize)
             16   0.43 / 1.13     0.043 / 0.35     0.22 / (noisy)   0.21 / 14
             64   0.31 / 1.17     0.12 / 0.39      0.76 / 17.6      0.81 / 13.9
            128   0.58 / 1.22     0.22 / 0.44      1.48 / 26        1.49 / 22
            192   0.82 / 1.34     0.32 / 0.52     10.5 / 23        13.5 / 14.7
            512  20 / 9.1         0.85 / 10.8     28 / 24          26 / 38
    q8_0 (split)  the kernel wins every matrix up to 96 rows; at 128, 192 x 576 ties and 576 x 1536 loses

The kernel's time grows linearly with the rows up to ~160 and then jumps (5-10x at 192 rows for the 1536-wide
matrices): for speed alone the limit would be 128 rows for 4-bit codes and 64 for split ones. It stays at 16
(KERNEL_MAX_ROWS): with 128, prompts of up to 128 tokens run through bf16 activations, and SmolLM2-135M-Instruct's
greedy answer to "What is the capital of France?" (`llmkit chat`) turned from "The capital of France is Paris." into
"L'Etoile, la Marseillaise, ..." (tests/test_quant_gguf_load.py's slow test); raising it needs that quality question
settled first (e.g. bf16 only for the serving engine's prefill, or an fp32-activation kernel).

So: few rows (decode, <= KERNEL_MAX_ROWS) on CPU -> every GGUF block format (q4_0, q4_1, q8_0, q5_0, q5_1, q4_k, q5_k,
q6_k) takes llmkit's own kernels on the file's blocks with int8 activations ("gguf", quant/native.py; measured in
docs/quantization.md), and f16/bf16 matrices and an LM head in q8_0 a float32-activation kernel ("gguf_float":
quant/native.py's for Q8_0; for f16/bf16 the decode linear op of llmkit.nn.decode_kernels, which streams the matrix
kept column-major in slabs, one per thread, widening the halves as it reads), where they build. Without a compiler,
and for the llmkit-only formats, the aten weight-only kernels with bf16 activations: `torch._weight_int8pack_mm` for
int8, `aten._weight_int4pack_mm_for_cpu` for every format with an affine block view (quant/affine.py: w = s q + z per
block of 32 or more inputs): int4, int4_asym, q4_0, q4_1, q4_k (exactly group-32 int4: s = d sc_j, z = -dmin m_j),
and, split into two 4-bit pieces in one call (quant/tinygemm.py), q8_0, q5_0, q5_1 and q5_k. Their fp32-activation
variants are 5-30x slower than fp32 here; f16/bf16 then multiply in their own half type (x cast to it), q6_k
dequantizes per call. nf4 (a code book) always dequantizes. Many rows (prefill, scoring) -> dequantize to the
activations' dtype and one F.linear, the fastest there.

The measurements below chose the aten paths before llmkit had its own kernels; they stand for the fallback.

Per-block-scaled int8 (q8_0) in one call: options measured (1 row, 2 threads, ms per call, best of 5; load average
3.5-7 on the 2-core VM, so indicative; benchmarks/quant_linear.py):

    out x in      fp32    split int4 x2   per-block loop   masked rows   compiled GEMV
    576 x 576     0.012       0.024            0.62            0.10        21 (!)
    1536 x 576    0.036       0.051            3.1             0.67         0.055
    576 x 1536    0.032       0.056            1.75            1.8          0.053
    49152 x 576  19.3         4.8             17.3            80             -     (dequantize + F.linear: 111)

- split int4 x2 (kept): q = 16 h + l, both 4-bit, one int4 kernel call over [x | x] (quant/tinygemm.py). Exact up
  to bf16 scales; 8 bits per code as int8, plus 4 bf16 per 32 weights (10.5 bits against Q8_0's 8.5 in the file).
- per-block loop (the previous path): one `_weight_int8pack_mm` per 32-wide block column, y = sum_b x_b Q_b^T
  diag(d_b): 18-48 calls per product, Python-bound for the small matrices.
- masked rows: the block scales folded out of the weight, P = (M * x) Q^T with M (n_blocks, in) the block masks
  and y = sum_b d_b P_b: one call, but n_blocks x the multiply work.
- torch.compile (inductor) of the fused dequantize-GEMV sum_k x_k q_ok d_o,k/32: on par with the split where
  inductor picks a good schedule, 1000x slower where it does not (576 x 576, reproduced), 0.2-35 s of compilation
  per shape and a C++ compiler at run time: not kept.
- a C++ extension built at pip install (not attempted: no wheel build on a fresh machine without a compiler) and
  numba (not installed; the split already runs at 1.5-2x fp32's time for one row, 4x faster for the head).
Decode through the bf16 kernels rounds x, the scales and y to bf16: |y - y_ref| <= 2^-8 (|x| |W_hat|^T) + 2^-8 |y|
(tests/test_quant_linear.py holds it to that).

The int4 kernels read the weight in tinygemm's layout (quant/tinygemm.py); the layer keeps the codes only in that
layout (plus the format's own scale bytes), so memory stays ~4 bits (split: 8) + scales per weight, and rebuilds the
format's canonical tensors when asked (`packed`, saving: byte for byte the file's, tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.nn import decode_kernels
from llmkit.nn.fused import FUSED_CALLABLE
from llmkit.nn.linear import prompt_product, prompt_product_applies
from llmkit.quant import affine, native
from llmkit.quant.formats import get_format
from llmkit.quant.packed import QuantizedWeight
from llmkit.quant.tinygemm import (
    KERNEL_GROUPS,
    codes_of,
    from_tinygemm,
    int4_matmul,
    kernel_weight,
    layout_tile,
    tinygemm_rows,
)

KERNEL_MAX_ROWS = 16  # most rows per call that take the kernels (decode); why not the measured 128: module docstring
SPLIT_SCHEMES = ("q8_0", "q5_0", "q5_1", "q5_k")  # codes wider than 4 bits: two 4-bit pieces (tinygemm.py)
HALF_SCHEMES = ("f16", "bf16")  # few rows: activations cast to the weight's half type, as llama.cpp does for F16


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`tensor`, copied when its data is not 64-byte aligned and contiguous: safetensors hands out tensors at any
    offset of the file, and aten's int8 weight-only kernel segfaulted here on such a weight. A column-major matrix
    (`is_column_major`: a fused product's F16/BF16 columns) is kept as it is."""
    if (tensor.is_contiguous() or is_column_major(tensor)) and tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.contiguous().clone()


def is_column_major(weight: torch.Tensor) -> bool:
    """Whether a matrix (out, in) is stored column-major with unit stride along out (weight.t() contiguous, or a
    block of columns of such a matrix: what decode_kernels.linear reads)."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0]


def kernel_for(packed: QuantizedWeight, int8_activations: bool = True) -> str:
    """"gguf", "gguf_float", "int8pack", "int4pack", "half" or "dequantize": the path a layer of this format takes
    for few rows. "gguf" / "gguf_float": llmkit's own kernels on the file's bytes (quant/native.py, where they build
    on this machine), with x rounded to int8 per block of 32 / with float32 x. `int8_activations=False` (the LM head)
    asks for float activations: the float kernel where the format has one, else aten's bf16-activation kernel, and
    int8 activations only where the alternative is dequantizing the whole matrix per call (Q6_K)."""
    scheme = packed.scheme
    if scheme in HALF_SCHEMES and decode_kernels.available():
        return "gguf_float"
    native_ok = (scheme in native.INT8_KINDS or scheme in native.FLOAT_SCHEMES) and native.native_kernels_available()
    if native_ok and scheme in native.FLOAT_SCHEMES and not int8_activations:
        return "gguf_float"
    if native_ok and scheme in native.INT8_KINDS and int8_activations:
        return "gguf"
    if scheme == "int8":
        return "int8pack"
    if scheme in HALF_SCHEMES:
        return "half"
    if (scheme in affine.AFFINE_SCHEMES and (scheme not in ("int4", "int4_asym") or packed.group_size in KERNEL_GROUPS)
            and layout_tile()):
        return "int4pack"
    return "gguf" if native_ok and scheme in native.INT8_KINDS else "dequantize"


class QuantLinear(nn.Module):
    """Frozen y = x W_hat^T + b with W held packed. Buffers `weight_<name>` are the format's tensors (int4pack: the
    4-bit kernel codes in tinygemm layout as `weight_int4pack` plus the extras of quant/affine.py that rebuild the
    format's bytes); `bias` a frozen parameter.

    `int8_activations=False` asks for float activations instead of llmkit's int8 ones (which round each block of x
    to int8, as llama.cpp does): the LM head passes it. Its logits decide the token directly, and int8 activations
    moved them by ~0.1, enough to flip SmolLM2's first answer to "What is the capital of France?" (a 0.08 margin);
    llama-quantize keeps the output matrix at higher precision for the same reason. A q8_0 head then takes the
    float32 kernel, 4-bit affine ones aten's bf16 kernel, q6_k still int8 (`kernel_for`)."""

    int8_prefill = False  # set_int8_prefill: a prompt's many rows on the 8-row kernel too (int8 activations)
    onednn_prompts = False  # llmkit.nn.fused.use_onednn_for_prompts: the dequantized product on oneDNN

    def __init__(self, packed: QuantizedWeight, bias: torch.Tensor | None = None, int8_activations: bool = True) -> None:
        super().__init__()
        packed = QuantizedWeight(packed.scheme, packed.shape, packed.group_size,
                                 {name: aligned(t) for name, t in packed.tensors.items()})
        self.scheme, self.group_size = packed.scheme, packed.group_size
        self.out_features, self.in_features = packed.shape
        self.kernel = kernel_for(packed, int8_activations)
        self.pieces = 2 if self.scheme in SPLIT_SCHEMES else 1
        if self.kernel == "int4pack":
            view = affine.split(packed)
            self.kernel_group = view.group
            codes, scales = kernel_weight(view, self.pieces)
            self.register_buffer("weight_int4pack", codes)
            for name, tensor in view.extras.items():
                self.register_buffer(f"weight_{name}", tensor.contiguous())
            self._extras = tuple(view.extras)
            # (pieces * in / group, out padded to 64, 2): scale and offset per group as the kernel reads them, bf16
            self.register_buffer("kernel_scales", scales, persistent=False)  # (derived, not saved)
        elif self.kernel == "gguf" and self.scheme in native.X8_SCHEMES:
            # the file's blocks regrouped 8 rows at a time for the 8-row kernel (native.to_x8: the same bytes, another
            # order); a fused product passes its parts' regrouped bytes as they are ("blocks_x8", quant/fused.py)
            x8 = packed.tensors.get("blocks_x8")
            self.register_buffer("weight_x8", x8 if x8 is not None else native.to_x8(packed.tensors["blocks"],
                                                                                      self.scheme))
            self._extras = ()
        elif self.kernel == "gguf_float" and self.scheme in HALF_SCHEMES:
            # column-major (weight.t() contiguous), what the decode linear op streams; a fused product passes its
            # parts' column blocks of one such matrix as they are (quant/fused.py)
            weight = packed.tensors["weight"]
            self.register_buffer("weight_weight", weight if is_column_major(weight) else weight.t().contiguous().t())
            self._extras = ("weight",)
        else:
            for name, tensor in packed.tensors.items():
                self.register_buffer(f"weight_{name}", tensor)
            self._extras = tuple(packed.tensors)
            if self.kernel == "int8pack":
                self.register_buffer("kernel_scales", packed.tensors["scale"].to(torch.bfloat16), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def kernel_rows(self) -> int:
        """Most rows per call that take the kernel path (0: this format always dequantizes; `set_int8_prefill` lifts
        the limit for the 8-row layout under inference mode)."""
        if self.kernel in ("gguf", "gguf_float"):
            return min(KERNEL_MAX_ROWS, native.MAX_ROWS)
        return 0 if self.kernel == "dequantize" else KERNEL_MAX_ROWS

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None) -> QuantLinear:
        """The quantized version of an nn.Linear (bias kept in its dtype, frozen)."""
        module = cls(get_format(scheme).quantize(linear.weight, group_size), linear.bias)
        return module.to(linear.weight.device)

    def _joined(self, kernel_codes: torch.Tensor, extras: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The format's QuantizedWeight of some rows from their 4-bit kernel codes (n, pieces * in) and extras."""
        codes = codes_of(kernel_codes, self.pieces)
        return affine.join(self.scheme, (codes.shape[0], self.in_features), self.group_size, codes, extras)

    @property
    def packed(self) -> QuantizedWeight:
        """The weight in its format's canonical tensors (what a checkpoint stores)."""
        extras = {name: getattr(self, f"weight_{name}") for name in self._extras}
        if self.kernel == "int4pack":
            return self._joined(from_tinygemm(self.weight_int4pack)[:self.out_features], extras)
        if "weight_x8" in self._buffers:
            extras = {"blocks": native.from_x8(self.weight_x8, self.scheme, self.out_features)}
        if self.scheme in HALF_SCHEMES:  # row-major as the format (and the file) lays it out: a copy when kept
            extras = {"weight": self.weight_weight.contiguous()}  # column-major for the decode linear op
        return QuantizedWeight(self.scheme, (self.out_features, self.in_features), self.group_size, extras)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme in HALF_SCHEMES:  # the values as they are (no row-major copy first): one cast
            return self.weight_weight.to(dtype)  # (out, in)
        if self._native_blocks():  # widened in C++, one pass (native.dequantize)
            if "weight_x8" in self._buffers:
                return native.dequantize_x8(self.weight_x8, self.scheme, self.out_features).to(dtype)
            return native.dequantize(self.weight_blocks, self.scheme, self.out_features).to(dtype)
        return get_format(self.scheme).dequantize(self.packed, dtype)  # (out, in)

    def _native_blocks(self) -> bool:
        """Whether the layer holds GGUF blocks for llmkit's CPU kernels, on the CPU (elsewhere: torch's ops)."""
        blocks = self._buffers.get("weight_x8", self._buffers.get("weight_blocks"))
        return self.kernel in ("gguf", "gguf_float") and blocks is not None and blocks.device.type == "cpu"

    def dequantized_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat[rows] (len(rows), in), dequantizing only those rows (blocks run along a row, so a row's packed
        bytes are the row alone): what an embedding lookup into a quantized table needs. Equal to
        dequantized_weight()[rows]."""
        rows = rows.reshape(-1)
        if self._native_blocks() and "weight_x8" in self._buffers:  # the rows' groups of 8 widened, rows picked
            values = native.dequantize_x8(self.weight_x8[rows // native.GROUP], self.scheme, len(rows) * native.GROUP)
            return values.view(len(rows), native.GROUP, -1)[torch.arange(len(rows)), rows % native.GROUP].to(dtype)
        if self._native_blocks():
            return native.dequantize(self.weight_blocks[rows], self.scheme, len(rows)).to(dtype)
        extras = {name: getattr(self, f"weight_{name}")[rows] for name in self._extras}
        if self.kernel == "int4pack":
            packed = self._joined(tinygemm_rows(self.weight_int4pack, rows), extras)
        elif self.scheme == "nf4":  # blocks and double-quantized scales run over the flattened weight
            return self.dequantized_weight(dtype)[rows]
        else:  # every other format stores one row of packed values (and scales) per output row
            packed = QuantizedWeight(self.scheme, (len(rows), self.in_features), self.group_size, extras)
        return get_format(self.scheme).dequantize(packed, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        fast = ((rows <= self.kernel_rows or (self.int8_prefill and torch.is_inference_mode_enabled()))
                and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad))
        return self.kernel_forward(x) if fast else self.dequantize_forward(x)

    def dequantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The many-row path: dequantize the whole weight to x's dtype, one F.linear (exact in x's dtype; on oneDNN
        under inference mode where `onednn_prompts` is set)."""
        weight, bias = self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        if self.onednn_prompts and prompt_product_applies(x, weight):
            return prompt_product(x, weight, bias)
        return F.linear(x, weight, bias)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The few-row path (CPU, no gradient): the aten weight-only kernel of `self.kernel` on the packed weight."""
        if self.kernel in ("gguf", "gguf_float"):  # llmkit's kernels: float32 (..., in) -> (..., out), no reshapes
            y = self.native_product(x if x.dtype == torch.float32 else x.float())
        else:
            flat = x.reshape(x.numel() // self.in_features, self.in_features)
            if self.kernel == "int8pack":
                y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight_qweight, self.kernel_scales)
            elif self.kernel == "half":
                y = F.linear(flat.to(self.weight_weight.dtype), self.weight_weight)
            else:
                y = int4_matmul(flat, self.weight_int4pack, self.kernel_group, self.kernel_scales, self.pieces,
                                self.out_features)
            y = y.view(*x.shape[:-1], self.out_features)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def native_product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) float32 W^T on llmkit's GGUF kernels (quant/native.py): the 8-row layout where the layer holds
        it, else the file's blocks (int8 activations), or float32 activations (`gguf_float`: Q8_0 blocks, or an
        F16/BF16 matrix kept column-major on the decode linear op)."""
        if self.kernel == "gguf_float":
            if self.scheme in HALF_SCHEMES:
                return decode_kernels.linear(x, self.weight_weight, None)
            return native.float_matmul(x, self.weight_blocks, self.out_features)
        if "weight_x8" in self._buffers:
            return native.x8_matmul(x, self.weight_x8, self.scheme, self.out_features)
        return native.gguf_matmul(x, self.weight_blocks, self.scheme, self.out_features)

    def decode_product(self) -> decode_kernels.DecodeProduct | None:
        """The product `native_product` runs (plus the bias), described for llmkit's whole-step decode op
        (llmkit.nn.decode_kernels.DecodeProduct); None for the formats on aten's kernels or dequantized per call."""
        bias = self.bias
        if self.kernel not in ("gguf", "gguf_float") or (bias is not None and bias.dtype != torch.float32):
            return None
        if self.kernel == "gguf_float" and self.scheme in HALF_SCHEMES:
            return decode_kernels.column_major_product(self.weight_weight, bias)
        if self.kernel == "gguf_float":
            return decode_kernels.DecodeProduct(f"{native.OPS}::matmul_float", self.weight_blocks, bias, 0,
                                                self.out_features)
        kind = native.INT8_KINDS[self.scheme]
        if "weight_x8" in self._buffers:
            return decode_kernels.DecodeProduct(f"{native.OPS}::matmul_x8", self.weight_x8, bias, kind,
                                                self.out_features)
        return decode_kernels.DecodeProduct(f"{native.OPS}::matmul", self.weight_blocks, bias, kind, self.out_features)

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


def set_int8_prefill(model: nn.Module, enabled: bool = True) -> int:
    """Let the model's Q4_0/Q4_1/Q8_0 layers on the 8-row kernel (and their fused q/k/v and gate/up products) run a
    prompt's rows with int8 activations too, under inference mode (generation's prefill, evaluation), as llama.cpp
    processes a prompt; returns how many layers it set.

    Off by default: those layers otherwise dequantize their blocks and run one float32 GEMM for more than
    KERNEL_MAX_ROWS rows, which gives the dequantized model's numbers. int8 prompts run 1.3-3.6x faster per product
    than MKL's GEMM (512 rows, SmolLM2's matrices, 2 threads, AVX2 VM; SmolLM2 Q4_0 prefill ~430 -> ~740 tok/s;
    against the oneDNN GEMM that load_decoder's models use, Q4_0 prefill 618 -> 818 on the Zen 4 VM) and answer as llama.cpp
    does: on SmolLM2-135M-Instruct's Q4_1 file, "What is the capital of France?" gets llama.cpp's "L'Étoile, la
    Mars..." where the float32 prompt gives "Paris" (a 0.08 logit margin in fp32). Never under no_grad alone, so a
    sequence scored with and without autograd (DPO's reference log-probabilities, PPO's first KL) is computed the
    same way."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    layers += [fused.layer for m in model.modules() if (fused := getattr(m, FUSED_CALLABLE, None)) is not None]
    count = 0
    for layer in layers:
        if "weight_x8" in layer._buffers:
            layer.int8_prefill = enabled
            count += 1
    return count
