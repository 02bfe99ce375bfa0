"""Integer weight formats with round-to-nearest (RTN) scales: int8 per output channel, int4 per group of inputs.

int8, per-output-channel symmetric (LLM.int8's vector-wise absmax without the outliers, Dettmers et al. 2022):

    s_i = max_k |W_ik| / 127,    q_ik = round(W_ik / s_i) in [-127, 127],    W_hat_ik = s_i q_ik,
    |W_ik - W_hat_ik| <= s_i / 2.
    tensors: qweight int8 (out, in), scale fp32 (out,)  -> 8 + 32 / in bits per weight

int4, group-wise along the input dimension, group g in {32, 64, 128} dividing in_features (as GPTQ/AWQ checkpoints):
groups G_ij = W_i, [j g, (j + 1) g). Two 4-bit codes share a byte (column 2k low nibble, 2k + 1 high).

    symmetric:   s_ij = max |G_ij| / 7,   u = round(W / s) + 8 in [1, 15],             W_hat = s (u - 8)
    asymmetric:  lo = min(min G_ij, 0), hi = max(max G_ij, 0) (the range holds 0, so zero stays exact),
                 s_ij = (hi - lo) / 15,  z_ij = round(-lo / s_ij) in [0, 15],
                 u = clamp(round(W / s) + z, 0, 15),                              W_hat = s (u - z)
    |W - W_hat| <= s_ij / 2 in both (asymmetric: lo / s + z and hi / s + z lie within 1/2 of 0 and 15,
    so the clamp moves a value by less than the half step it would round by anyway).
    tensors: codes uint8 (out, in / 2), scale fp32 (out, in / g) [, zero uint8 (out, in / g)]
             -> 4 + 32 / g (+ 8 / g) bits per weight: 5.0 (5.25) at g = 32
An all-zero row or group gets scale 0 and dequantizes to exact zeros.
"""

from __future__ import annotations

import torch

from llmkit.quant.packed import QuantizedWeight, check_group, check_weight, pack_nibbles, unpack_nibbles

INT8_MAX = 127
INT4_GROUPS = (32, 64, 128)
INT4_DEFAULT_GROUP = 32
_TINY = torch.finfo(torch.float32).tiny


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """int8 codes and one fp32 scale per output row (`group_size` must be None: the group is the whole row)."""
    from llmkit.errors import LlmkitError

    if group_size is not None:
        raise LlmkitError(f"int8 is per output channel: --group_size does not apply (got {group_size}); leave it out")
    w = check_weight(weight, "int8")
    scale = w.abs().amax(dim=1) / INT8_MAX  # (out,)
    q = torch.round(w / scale.clamp_min(_TINY)[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight("int8", tuple(w.shape), None, {"qweight": q, "scale": scale})


def dequantize_int8(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    return (t["qweight"].float() * t["scale"][:, None]).to(dtype)  # (out, in)


def _quantize_int4(weight: torch.Tensor, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    scheme = "int4" if symmetric else "int4_asym"
    w = check_weight(weight, scheme)
    group_size = INT4_DEFAULT_GROUP if group_size is None else group_size
    check_group(scheme, w.shape[1], group_size, INT4_GROUPS)
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)  # (out, n_groups, g)
    if symmetric:
        scale = groups.abs().amax(dim=-1) / 7  # (out, n_groups)
        zero = torch.full_like(scale, 8)
    else:
        low, high = groups.amin(dim=-1).clamp_max(0), groups.amax(dim=-1).clamp_min(0)  # the range holds 0
        scale = (high - low) / 15
        zero = torch.round(-low / scale.clamp_min(_TINY)).clamp(0, 15)
    codes = torch.round(groups / scale.clamp_min(_TINY)[..., None]) + zero[..., None]
    codes = codes.clamp(0, 15).to(torch.uint8).view(out_features, in_features)
    tensors = {"codes": pack_nibbles(codes), "scale": scale}
    if not symmetric:
        tensors["zero"] = zero.to(torch.uint8)
    return QuantizedWeight(scheme, (out_features, in_features), group_size, tensors)


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int4, one fp32 scale per group of `group_size` inputs (default 32)."""
    return _quantize_int4(weight, group_size, symmetric=True)


def quantize_int4_asym(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Asymmetric int4: one fp32 scale and one 4-bit zero point (held in a uint8) per group."""
    return _quantize_int4(weight, group_size, symmetric=False)


def int4_codes_scale_zero(packed: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), scale fp32 (out, n_groups), zero fp32 (out, n_groups)) of an int4 weight."""
    t = packed.tensors
    zero = t["zero"].float() if "zero" in t else torch.full_like(t["scale"], 8)
    return unpack_nibbles(t["codes"]), t["scale"], zero


def dequantize_int4(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes, scale, zero = int4_codes_scale_zero(packed)
    out_features, in_features = packed.shape
    groups = codes.view(out_features, -1, packed.group_size).float()  # (out, n_groups, g)
    return ((groups - zero[..., None]) * scale[..., None]).view(out_features, in_features).to(dtype)
