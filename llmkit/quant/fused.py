"""One product for q/k/v and one for gate/up where every part is a QuantLinear on llmkit's GGUF kernels (quant/native.py):
the float counterpart of llmkit.nn.fused for quantized (and F16/BF16 GGUF) decoders.

A GGUF block matrix is its rows' bytes one after another, so the parts' blocks concatenated along the rows are the
blocks of [W_q; W_k; W_v] (or [W_gate; W_up]) and one kernel call gives [q | k | v] (F16/BF16 matrices, kept
column-major, are joined along their columns instead): 7 quantized products per SmolLM2 block become 4, and the narrow
k and v (192 rows) stop being calls of their own. The parts' buffers become row views of the concatenation, so no byte
is held twice; names, `packed`, checkpoints and adapters see the parts as before. The product is used while the module
still holds those very parts (`FusedBlocks.covers`): a part that PEFT wraps or a transformation replaces is run on its
own again, as `llmkit.nn.fused.fused_product` does for float parts.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.nn.decode_kernels import DecodeProduct
from llmkit.nn.fused import FUSED_CALLABLE
from llmkit.quant import native
from llmkit.quant.linear import HALF_SCHEMES, QuantLinear
from llmkit.quant.packed import QuantizedWeight


class FusedBlocks:
    """The fused product of a module's quantized FUSED_PROJECTIONS (a plain object, not a submodule: its layer's
    buffers are the parts' bytes, which the module tree already holds)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        self.names = names
        self.parts = [getattr(module, name) for name in names]
        first = self.parts[0]
        self.buffer = kernel_buffer(first)
        # the parts' bytes along the rows (blocks: one row per output row; regrouped: one row per 8 output rows,
        # which every part fills, can_fuse_blocks)
        per_row = native.GROUP if self.buffer == "weight_x8" else 1
        sizes = [part.out_features // per_row for part in self.parts]
        if self.buffer == "weight_weight":  # F16/BF16 matrices kept column-major: [W_q; W_k; W_v]^T's columns
            rows = torch.cat([part.weight_weight.t() for part in self.parts], dim=1).t()
        else:
            rows = torch.cat([getattr(part, self.buffer) for part in self.parts])
        for part, view in zip(self.parts, rows.split(sizes)):
            setattr(part, self.buffer, view)  # a view: the parts' bytes live in the concatenation
        bias = None if first.bias is None else torch.cat([part.bias for part in self.parts])
        out_features = sum(part.out_features for part in self.parts)
        key = {"weight_x8": "blocks_x8", "weight_blocks": "blocks", "weight_weight": "weight"}[self.buffer]
        packed = QuantizedWeight(first.scheme, (out_features, first.in_features), first.group_size, {key: rows})
        self.layer = QuantLinear(packed, bias)

    def covers(self, module: nn.Module) -> bool:
        """Whether `module` still holds the parts this product was built from, their bytes still in the fused
        matrix (`model.to(...)` gives the parts new buffers). While torch.compile traces, only the identities are
        checked: dynamo cannot trace storage pointers (as llmkit.nn.fused's check)."""
        if not all(getattr(module, name) is part for name, part in zip(self.names, self.parts)):
            return False
        if torch.compiler.is_compiling():
            return True
        storage = getattr(self.layer, self.buffer).untyped_storage().data_ptr()
        return all(getattr(part, self.buffer).untyped_storage().data_ptr() == storage for part in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # (..., sum of out)

    def decode_product(self) -> DecodeProduct | None:
        """The one product's description for llmkit's whole-step decode op (QuantLinear.decode_product)."""
        return self.layer.decode_product()


def kernel_buffer(layer: QuantLinear) -> str:
    """The buffer llmkit's GGUF kernel reads: the file's blocks, their 8-row regrouping (native.to_x8), or an F16/BF16
    matrix (the float kernel's)."""
    if "weight_x8" in layer._buffers:
        return "weight_x8"
    return "weight_weight" if layer.scheme in HALF_SCHEMES else "weight_blocks"


def can_fuse_blocks(parts: list[nn.Module]) -> bool:
    """QuantLinears on llmkit's GGUF kernels (int8-activation blocks, or F16/BF16 matrices on the float kernel) with
    one scheme, layout and input width, a bias on all or none, and (when regrouped 8 rows at a time) output rows that
    fill whole groups."""
    if not all(isinstance(part, QuantLinear) and (part.kernel == "gguf" or (
            part.kernel == "gguf_float" and part.scheme in HALF_SCHEMES)) for part in parts):
        return False
    layouts = {kernel_buffer(part) for part in parts}
    return (len({(part.scheme, part.in_features) for part in parts}) == 1 and len(layouts) == 1
            and len({part.bias is None for part in parts}) == 1
            and (layouts != {"weight_x8"} or all(part.out_features % native.GROUP == 0 for part in parts)))


def fuse_quantized_projections(model: nn.Module) -> nn.Module:
    """Give every module whose FUSED_PROJECTIONS are all fusable quantized parts one product for them (module
    docstring). In place; returns the model."""
    with torch.no_grad():
        for module in model.modules():
            names = getattr(type(module), "FUSED_PROJECTIONS", None)
            if names and can_fuse_blocks([getattr(module, name) for name in names]):
                setattr(module, FUSED_CALLABLE, FusedBlocks(module, names))
    return model
