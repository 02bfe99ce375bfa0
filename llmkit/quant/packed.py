"""The one shape every quantized weight takes in llmkit: `QuantizedWeight`, a small dataclass of tensors plus the
static fields needed to read them (scheme, the float weight's shape, group size), and the input checks all formats
share. Each format module (integer.py, gguf_blocks.py, nf4.py) fills the tensors its own way; formats.py registers them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.errors import LlmkitError


@dataclass
class QuantizedWeight:
    """A 2-D weight (out_features, in_features) in a quantized format: `tensors` holds the packed integers and scales
    by name (what a checkpoint stores), `group_size` the number of weights that share one scale (None: per row)."""

    scheme: str
    shape: tuple[int, int]  # (out_features, in_features) of the float weight
    group_size: int | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of all packed tensors: what the weight costs in memory and on disk."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])


def check_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The weight as a detached fp32 (out, in) tensor; raises on anything else, or on inf/NaN values."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        what = f"a {weight.dim()}-D {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LlmkitError(f"{scheme} quantizes 2-D floating-point weights (out_features, in_features); got {what}: "
                          "reshape it to 2-D or leave it unquantized")
    if weight.numel() == 0:
        raise LlmkitError(f"{scheme} cannot quantize an empty weight of shape {tuple(weight.shape)}")
    weight = weight.detach().float().contiguous()  # row-major, also for column-major storage
    if not bool(torch.isfinite(weight).all()):
        raise LlmkitError(f"weight of shape {tuple(weight.shape)} holds inf or NaN; {scheme} needs finite values")
    return weight


def check_group(scheme: str, in_features: int, group_size: int, allowed: tuple[int, ...]) -> None:
    """Raise unless `group_size` is one of `allowed` and divides the weight's input width."""
    if isinstance(group_size, bool) or group_size not in allowed:
        raise LlmkitError(f"{scheme} --group_size must be one of {', '.join(map(str, allowed))}; got {group_size!r}")
    if in_features % group_size:
        fits = [g for g in allowed if in_features % g == 0]
        hint = f"pass --group_size {fits[-1]}" if fits else f"this scheme cannot hold a width of {in_features}"
        raise LlmkitError(f"{scheme} --group_size {group_size} does not divide in_features {in_features} (groups run "
                          f"along the input dimension); {hint}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes 0..15 -> (out, in / 2) uint8, column 2j in the low nibble and 2j + 1 in the high one."""
    pairs = codes.to(torch.uint8).view(codes.shape[0], -1, 2)  # (out, in / 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (out, in / 2) uint8 -> (out, in) uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)
