"""NF4, the 4-bit NormalFloat format of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs", arXiv:2305.14314): block-wise quantisation, double quantisation of the scales, and the frozen linear layer
that QLoRA trains LoRA on top of.

Code book. Pretrained weights are roughly normal, so the 16 codes are quantiles of N(0, 1) scaled into [-1, 1]:

    q = Phi^-1(p) / Phi^-1(1 - delta),    delta = (1/30 + 1/32) / 2,

for the positive half at p = 8 of 9 points evenly spaced from 1 - delta down to 0.5 (0.5 itself dropped), for the
negative half minus the same at 7 of 8 points, plus an exact 0 so that zeros stay zero: 16 values, 4 bits, the table
bitsandbytes ships.

Block-wise absmax quantisation. The flattened weight (row-major) is cut into blocks of B = 64 values (the last one
padded with zeros); block b keeps its absmax s_b = max |w| in fp32 and each value keeps the index of the nearest code:

    i(w) = argmin_i |w / s_b - q_i|,    w_hat = s_b q_i(w),    |w - w_hat| <= s_b max_i (q_(i+1) - q_i) / 2.

Two 4-bit indices share one uint8 (the first value in the high nibble, as bitsandbytes).

Double quantisation. fp32 scales cost 32 / 64 = 0.5 bit per weight. QLoRA quantises them again: subtract their mean m,
cut them into blocks of 256, and store int8 codes round(127 (s_b - m) / c_g) with one fp32 absmax c_g per block g of
scales. Cost: 8 / 64 + 32 / (64 * 256) = 0.127 bit per weight (4.127 bits in all, against 4.5 without), and each scale
moves by at most c_g / 254, so |w - w_hat| <= s_b max_gap / 2 + c_g / 254. (The paper codes the scales with an 8-bit
float; int8 absmax, its Eq. 1, has the same size and a plainer bound.)

`NF4Linear` holds the packed codes and scales as buffers (frozen by construction) and computes y = x W_hat^T + b in a
compute dtype (fp32 or bf16), dequantising W at each call: the memory of 4-bit weights, ordinary arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError

DEFAULT_BLOCK_SIZE = 64  # weights per absmax scale (QLoRA, bitsandbytes)
SCALE_BLOCK_SIZE = 256  # scales per second-level scale in double quantisation (QLoRA)
SCALE_CODE_MAX = 127  # int8 codes of the double-quantised scales lie in [-127, 127]
TAIL_OFFSET = 1 - (1 / 30 + 1 / 32) / 2  # largest quantile probability of the code book (0.9677083)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values (float32, ascending): normal quantiles scaled to [-1, 1], from the definition above."""
    positive = torch.special.ndtri(torch.linspace(TAIL_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(TAIL_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


NF4_CODE_BOOK = nf4_code_book()
# Decision boundaries: a normalised value goes to code i when it lies between midpoints i - 1 and i.
_MIDPOINTS = (NF4_CODE_BOOK[1:] + NF4_CODE_BOOK[:-1]) / 2
# Both values of every byte: dequantising is one lookup per byte, (256, 2) = (high nibble, low nibble).
_BYTE_TABLE = torch.stack([NF4_CODE_BOOK.repeat_interleave(16), NF4_CODE_BOOK.repeat(16)], dim=1)


@dataclass
class NF4Tensor:
    """A 2-D weight in NF4: packed 4-bit codes plus block scales (int8 + fp32 second level when double-quantised)."""

    codes: torch.Tensor  # uint8 (n_blocks * block_size / 2,): two code indices per byte
    absmax: torch.Tensor  # float32 (n_blocks,), or int8 (n_blocks,) when double-quantised
    absmax_scale: torch.Tensor | None  # float32 (ceil(n_blocks / 256),): c_g, the absmax of each block of scales
    absmax_offset: torch.Tensor | None  # float32 (): m, the mean scale subtracted before double quantisation
    shape: tuple[int, int]
    dtype: torch.dtype  # dtype of the original weight (what dequantize_nf4 returns by default)
    block_size: int

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales together (what the weight costs in memory)."""
        tensors = [self.codes, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise LlmkitError(f"NF4 block_size must be an even integer >= 2 (two 4-bit codes share a byte); got "
                          f"{block_size!r}: use {DEFAULT_BLOCK_SIZE} as QLoRA does")


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit code indices (0..15) per uint8, the first in the high nibble; `codes` has an even length."""
    pairs = codes.to(torch.uint8).view(-1, 2)  # (n / 2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The code indices (uint8, 0..15) of packed bytes, in their original order."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)  # (n / 2, 2) -> (n,)


def nearest_codes(normalised: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the NF4 code nearest to each value in [-1, 1]."""
    return torch.bucketize(normalised, _MIDPOINTS.to(normalised.device)).to(torch.uint8)


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: (int8 codes, fp32 absmax per block of 256, fp32 mean) of fp32 block scales."""
    offset = absmax.mean()
    centred = absmax - offset
    n_groups = math.ceil(centred.numel() / SCALE_BLOCK_SIZE)
    groups = F.pad(centred, (0, n_groups * SCALE_BLOCK_SIZE - centred.numel())).view(n_groups, SCALE_BLOCK_SIZE)
    group_absmax = groups.abs().amax(dim=1)  # (n_groups,)
    step = (group_absmax / SCALE_CODE_MAX).clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # all-equal group: codes 0
    codes = torch.round(groups / step).clamp(-SCALE_CODE_MAX, SCALE_CODE_MAX).to(torch.int8)
    return codes.view(-1)[: absmax.numel()], group_absmax, offset


def dequantize_scales(codes: torch.Tensor, group_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 block scales back from their int8 codes: code * c_g / 127 + m."""
    step = (group_absmax / SCALE_CODE_MAX).repeat_interleave(SCALE_BLOCK_SIZE)[: codes.numel()]  # (n_blocks,)
    return codes.float() * step + offset


def quantize_nf4(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True) -> NF4Tensor:
    """NF4 codes and scales of a 2-D floating-point weight (out, in), block-wise over its row-major values."""
    _check_block_size(block_size)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        what = f"a {weight.dim()}-D {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LlmkitError(f"NF4 quantises 2-D floating-point weights (out_features, in_features); got {what}: "
                          "reshape it to 2-D or leave it unquantised")
    if weight.numel() == 0:
        raise LlmkitError(f"NF4 cannot quantise an empty weight of shape {tuple(weight.shape)}")
    flat = weight.detach().float().reshape(-1)  # row-major order, also for column-major storage
    n_blocks = math.ceil(flat.numel() / block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    if not torch.isfinite(absmax).all():
        raise LlmkitError(f"weight of shape {tuple(weight.shape)} holds inf or NaN; NF4 needs finite values")
    normalised = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # (n_blocks, B) in [-1, 1]
    codes = pack_codes(nearest_codes(normalised).view(-1))
    scale_codes = scale = offset = None
    if double_quant:
        scale_codes, scale, offset = quantize_scales(absmax)
    return NF4Tensor(codes=codes, absmax=scale_codes if double_quant else absmax, absmax_scale=scale,
                     absmax_offset=offset, shape=(weight.shape[0], weight.shape[1]), dtype=weight.dtype,
                     block_size=block_size)


def block_scales(q: NF4Tensor) -> torch.Tensor:
    """The fp32 scale of each block as dequantisation uses it (after undoing double quantisation)."""
    if q.double_quant:
        return dequantize_scales(q.absmax, q.absmax_scale, q.absmax_offset)
    return q.absmax


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (out, in) from its NF4 codes and scales, in `dtype` (default: the original weight's dtype)."""
    values = _BYTE_TABLE.to(q.codes.device).index_select(0, q.codes.int())  # (n / 2, 2): both codes of each byte
    blocks = values.view(-1, q.block_size) * block_scales(q)[:, None]  # (n_blocks, B)
    out_features, in_features = q.shape
    return blocks.view(-1)[: out_features * in_features].view(out_features, in_features).to(dtype or q.dtype)


def resolve_compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """float32 or bfloat16, given as a name or a torch dtype."""
    resolved = COMPUTE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in COMPUTE_DTYPES.values():
        raise LlmkitError(f"NF4 compute dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {dtype!r}")
    return resolved


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (buffers) and dequantised into `compute_dtype` per call."""

    _FLOAT32_BUFFERS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        compute_dtype: str | torch.dtype = torch.float32,
        block_size: int = DEFAULT_BLOCK_SIZE,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Empty (zero) buffers of the right shapes: fill them with `from_linear` or `load_state_dict`."""
        super().__init__()
        _check_block_size(block_size)
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.compute_dtype = resolve_compute_dtype(compute_dtype)
        self.weight_dtype = weight_dtype
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("weight_codes", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8))
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.int8 if double_quant else torch.float32))
        n_groups = math.ceil(n_blocks / SCALE_BLOCK_SIZE)
        self.register_buffer("weight_absmax_scale", torch.zeros(n_groups) if double_quant else None)
        self.register_buffer("weight_absmax_offset", torch.zeros(()) if double_quant else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: str | torch.dtype = torch.float32,
        block_size: int = DEFAULT_BLOCK_SIZE,
        double_quant: bool = True,
    ) -> NF4Linear:
        """The NF4 version of an nn.Linear (its bias kept as is, frozen)."""
        q = quantize_nf4(linear.weight, block_size, double_quant)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, block_size,
                     double_quant, linear.weight.dtype)
        module.load_nf4(q)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module.to(linear.weight.device)

    def load_nf4(self, q: NF4Tensor) -> None:
        """Hold `q` (same shape, block size and double quantisation as this layer) as the weight."""
        if q.shape != (self.out_features, self.in_features) or q.block_size != self.block_size:
            raise LlmkitError(f"NF4 weight of shape {q.shape}, block size {q.block_size} does not fit this layer "
                              f"({self.out_features}, {self.in_features}), block size {self.block_size}; quantise a "
                              f"weight of that shape with block_size={self.block_size}")
        self.weight_codes, self.weight_absmax = q.codes, q.absmax
        self.weight_absmax_scale, self.weight_absmax_offset = q.absmax_scale, q.absmax_offset
        self.weight_dtype = q.dtype

    @property
    def nf4_weight(self) -> NF4Tensor:
        return NF4Tensor(codes=self.weight_codes, absmax=self.weight_absmax, absmax_scale=self.weight_absmax_scale,
                         absmax_offset=self.weight_absmax_offset, shape=(self.out_features, self.in_features),
                         dtype=self.weight_dtype, block_size=self.block_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.nf4_weight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        y = F.linear(x.to(self.compute_dtype), self.dequantized_weight(), bias)
        return y.to(x.dtype)  # the layer keeps its input's dtype, as bitsandbytes' Linear4bit

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        # `model.to(torch.bfloat16)` casts floating buffers: the fp32 scales must keep every bit (they only move device).
        saved = {name: getattr(self, name) for name in self._FLOAT32_BUFFERS if getattr(self, name) is not None}
        module = super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.weight_absmax_scale is not None}, "
                f"compute_dtype={self.compute_dtype}")


def quantize_model_nf4(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    compute_dtype: str | torch.dtype = torch.float32,
    double_quant: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> nn.Module:
    """Replace, in place, every nn.Linear whose attribute name is in `targets` by an NF4Linear; returns the model."""
    compute_dtype = resolve_compute_dtype(compute_dtype)
    _check_block_size(block_size)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        already = any(isinstance(module, NF4Linear) for module in model.modules())
        hint = "the model is already quantised" if already else "pass targets that name linear layers"
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise LlmkitError(f"no nn.Linear named {list(targets)} in the model (its linear layers: {linears[:4]}); {hint}")
    for name, linear in found:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, NF4Linear.from_linear(linear, compute_dtype, block_size, double_quant))
    return model


def nf4_memory_report(model: nn.Module) -> dict[str, float]:
    """Bytes of the model with its NF4 linears (codes + scales) against the same model all in fp32 or bf16."""
    quantized = [module for module in model.modules() if isinstance(module, NF4Linear)]
    if not quantized:
        raise LlmkitError("the model holds no NF4Linear layer; run quantize_model_nf4(model) first")
    quantized_parameters = sum(module.in_features * module.out_features for module in quantized)
    quantized_bytes = sum(module.nf4_weight.nbytes for module in quantized)
    others = {id(p): p for p in model.parameters()}  # a tied head counts once
    other_parameters = sum(p.numel() for p in others.values())
    other_bytes = sum(p.numel() * p.element_size() for p in others.values())
    total = quantized_parameters + other_parameters
    return {
        "quantized_parameters": quantized_parameters,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_parameter": 8 * quantized_bytes / quantized_parameters,
        "quantized_bytes_fp32": 4 * quantized_parameters,
        "quantized_bytes_bf16": 2 * quantized_parameters,
        "other_parameters": other_parameters,
        "other_bytes": other_bytes,
        "model_bytes_nf4": quantized_bytes + other_bytes,
        "model_bytes_fp32": 4 * total,
        "model_bytes_bf16": 2 * total,
    }
