"""Fused projections for inference: q/k/v in one matrix product, gate/up in one.

A decode step multiplies one row x by every weight, so its speed is how fast the weights stream from memory and how
many small kernels run per token. Attention's three input projections and a gated MLP's two read the same x, so one
product over the row-wise concatenation of their weights gives all of them at once:

    [q | k | v] = x [W_q; W_k; W_v]^T (+ [b_q; b_k; b_v]),    [g | u] = x [W_gate; W_up]^T

Same numbers up to the kernel's blocking (each output column is still the dot product of x with its own weight row),
one weight read and one kernel launch instead of three (or two): on SmolLM2-135M, 211 matrix products per token
become 121 (docs/benchmarks.md, "Decode speed").

Why views, not a new module: `fuse_projections` allocates the concatenated weight and turns each projection's weight
(and bias) into a view of its rows. The module tree and parameter names stay as they were, so checkpoints
(q_proj/k_proj/v_proj), LoRA and quantization targets, Hugging Face and GGUF export, and `load_state_dict` (it copies
into the views, so into the fused tensor) all work unchanged, with no extra memory. The fused product runs only while
every part is still a plain `Linear` whose weight is such a view (`fused_product`): a projection that PEFT or
quantization swapped, or a weight that `model.to(...)` or an assignment replaced, falls back to separate products
without a word, because the separate products are then the truth. `unfuse_projections` gives each part its own
storage again (the inverse). Quantized parts are fused by llmkit.quant.fused where their blocks allow it (llmkit's
GGUF kernels), which sets a callable under FUSED_CALLABLE that `fused_product` runs instead.

Training (`fused_product` with gradients on): the product runs through `FusedLinear`, an autograd function whose
forward is the same one product over the fused tensor (cast once to the autocast dtype under mixed precision) and
whose backward computes the whole weight gradient in one product too,

    dL/dx = dL/dy [W_q; W_k; W_v],    dL/d[W_q; W_k; W_v] = (dL/dy)^T x,

then hands each part's rows to that part's own parameter. So the optimizer, weight-decay groups, gradient clipping
and checkpoints still see q_proj/k_proj/v_proj as separate parameters (an in-place optimizer step writes through the
views into the fused tensor), and no concatenated copy of the weights is made per step (`--train.fused_projections`).

A module opts in by naming its fusable projections in a class attribute `FUSED_PROJECTIONS` (Attention: q, k, v;
SwiGLU / GeGLU: gate, up).

`pack_bfloat16_weights` is the other inference-time step for the decode loop: a oneDNN-packed copy of each bfloat16
matrix the one-token products read (see llmkit/nn/linear.py for why and the measured gain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.nn.decode_kernels import DecodeProduct
from llmkit.nn.linear import Linear, PackedWeight, can_pack, float_product, linear

FUSED_WEIGHT = "fused_weight"  # buffer names on the fusing module (not saved: the parts hold the values)
FUSED_BIAS = "fused_bias"
FUSED_PACKED = "fused_packed"  # oneDNN copy of the fused weight (pack_bfloat16_weights)
FUSED_CALLABLE = "fused_quantized"  # one product over quantized parts, set from llmkit.quant.fused (x -> outputs)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Join the projections every module names in `FUSED_PROJECTIONS` into one product each (see the module
    docstring). In place; returns the model. Modules whose parts are not plain float `Linear`s of one dtype and
    device, with biases on all or none, are left as they are."""
    with torch.no_grad():
        for module in model.modules():
            names = getattr(type(module), "FUSED_PROJECTIONS", None)
            if names and can_fuse([getattr(module, name) for name in names]):
                _fuse(module, names)
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """The inverse of `fuse_projections`: each part gets its own contiguous storage (same values and layout as
    before fusing) and the fused buffers are dropped. In place; returns the model."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, FUSED_WEIGHT, None) is None:
                continue
            for name in type(module).FUSED_PROJECTIONS:
                part = getattr(module, name)
                part.weight.data = _own_copy(part.weight.data)
                if part.bias is not None:
                    part.bias.data = part.bias.data.clone()
            setattr(module, FUSED_WEIGHT, None)
            setattr(module, FUSED_BIAS, None)
            setattr(module, FUSED_PACKED, None)
    return model


def pack_bfloat16_weights(model: nn.Module) -> nn.Module:
    """Give each bfloat16 CPU matrix that a one-token decode step multiplies a oneDNN-packed copy (`PackedWeight`):
    fused weights, plain `Linear`s outside a fused group, and a tied LM head (a module with a `head_packed` slot, the
    Decoder, packs its `embed.weight`). Call after `fuse_projections`. The copies cost the packed weights' memory
    again (bf16 then holds about the fp32 model's bytes) and are used only while their weight is unchanged;
    parameters, names and checkpoints stay as they are. In place; returns the model."""
    in_fused_group = set()
    for module in model.modules():
        weight = getattr(module, FUSED_WEIGHT, None)
        if weight is not None and can_pack(weight):
            parts = [getattr(module, name) for name in type(module).FUSED_PROJECTIONS]
            # the parts' parameters are what a write changes (a write through a view leaves the fused tensor's
            # version as it was), so the packed copy watches them
            sources = [weight] + [p for part in parts for p in (part.weight, part.bias) if p is not None]
            setattr(module, FUSED_PACKED, PackedWeight(weight, sources))
            in_fused_group.update(id(part) for part in parts)
    for module in model.modules():
        if type(module) is Linear and id(module) not in in_fused_group and can_pack(module.weight):
            module.packed = PackedWeight(module.weight)
        if hasattr(module, "head_packed") and getattr(module, "lm_head", None) is None and can_pack(module.embed.weight):
            module.head_packed = PackedWeight(module.embed.weight)
    return model


def use_onednn_for_prompts(model: nn.Module) -> nn.Module:
    """Run the many-row products that `model` computes under inference mode on oneDNN (llmkit.nn.linear.
    prompt_product: 1.1-4x MKL's float32 GEMM where measured): its `Linear`s, fused projections, tied head and
    quantized layers' dequantized products (every module with an `onednn_prompts` attribute, the modules holding a
    fused weight, and the quantized fused products' layers). What `load_decoder` does for the verbs that run a model;
    under autograd, or no_grad alone, every product stays F.linear. In place; returns the model."""
    for module in model.modules():
        if hasattr(module, "onednn_prompts") or hasattr(module, FUSED_WEIGHT):
            module.onednn_prompts = True
        quantized = getattr(module, FUSED_CALLABLE, None)
        if quantized is not None:
            quantized.layer.onednn_prompts = True
    return model


def can_fuse(parts: list[nn.Module]) -> bool:
    """Whether `parts` can share one product: plain float Linears with one input width, dtype and device, and a bias
    on all or none."""
    if not all(type(part) is Linear for part in parts):
        return False
    weights = [part.weight for part in parts]
    return (
        weights[0].is_floating_point()
        and len({(w.shape[1], w.dtype, w.device) for w in weights}) == 1
        and len({part.bias is None for part in parts}) == 1
    )


def fused_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The outputs of `module`'s FUSED_PROJECTIONS on x (..., in), side by side in one tensor (..., sum of out) from
    one product, or None where the module is not fused or a part no longer is a view of the fused weight (then the
    caller runs the parts one by one)."""
    quantized = getattr(module, FUSED_CALLABLE, None)  # quantized parts (llmkit.quant.fused), while still in place
    if quantized is not None and quantized.covers(module):
        return quantized(x)
    weight = getattr(module, FUSED_WEIGHT, None)
    if weight is None or not _still_fused(module, weight):
        return None
    if torch.is_grad_enabled():
        parts = [getattr(module, name) for name in type(module).FUSED_PROJECTIONS]
        parameters = [part.weight for part in parts] + [part.bias for part in parts if part.bias is not None]
        if any(parameter.requires_grad for parameter in parameters) or x.requires_grad:
            sizes = tuple(part.weight.shape[0] for part in parts)
            return FusedLinear.apply(x, weight, getattr(module, FUSED_BIAS), sizes, *parameters)
    return linear(x, weight, getattr(module, FUSED_BIAS), getattr(module, FUSED_PACKED, None),
                  getattr(module, "onednn_prompts", False))


def decode_products(module: nn.Module) -> list[DecodeProduct] | None:
    """The products `fused_product` and the parts run for `module`'s FUSED_PROJECTIONS in a one-token step on
    llmkit's kernels, their outputs side by side: [the fused product] where the module is fused, else each part's;
    None where one of them runs another path (for llmkit's whole-step op, llmkit/generate/native_step.py)."""
    quantized = getattr(module, FUSED_CALLABLE, None)
    if quantized is not None and quantized.covers(module):
        product = quantized.decode_product()
        return None if product is None else [product]
    weight = getattr(module, FUSED_WEIGHT, None)
    if weight is not None and _still_fused(module, weight):
        product = float_product(weight, getattr(module, FUSED_BIAS))
        return None if product is None else [product]
    parts = [layer_product(getattr(module, name)) for name in type(module).FUSED_PROJECTIONS]
    return None if any(part is None for part in parts) else parts


def layer_product(layer: nn.Module) -> DecodeProduct | None:
    """The one product a projection runs in a one-token step on llmkit's kernels (its `decode_product`), or None
    where it runs another path (a wrapper, aten's kernels, a module that cannot say)."""
    return getattr(layer, "decode_product", lambda: None)()


class FusedLinear(torch.autograd.Function):
    """y = x W^T + b over a fused weight W (sum of out, in) whose row blocks (sizes) are the parts' parameters; the
    backward returns each part's gradient to its own parameter (see the module docstring). Under autocast the
    product runs in the autocast dtype with W cast once, as F.linear would; gradients come back in each parameter's
    dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...],  # noqa: ANN001
                *parameters: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        w = weight.to(compute)  # (sum of out, in); no copy in fp32
        x_compute = x.to(compute)
        with torch.autocast(device_type, enabled=False):
            y = F.linear(x_compute, w, None if bias is None else bias.to(compute))  # (..., sum of out)
        ctx.save_for_backward(x_compute, w)
        ctx.sizes, ctx.x_dtype = sizes, x.dtype
        ctx.dtypes = [parameter.dtype for parameter in parameters]
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        grad_y = grad_y.to(w.dtype)
        grad_x = (grad_y @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        if not any(ctx.needs_input_grad[4:]):  # frozen parts (e.g. prompt tuning): only x's gradient
            return (grad_x, None, None, None, *[None] * len(ctx.dtypes))
        rows = grad_y.reshape(-1, grad_y.shape[-1])  # (N, sum of out)
        grad_w = rows.T @ x.reshape(-1, x.shape[-1])  # (sum of out, in): one product for every part
        grads = list(grad_w.split(ctx.sizes))
        if ctx.has_bias:
            grads += list(rows.sum(0).split(ctx.sizes))
        grads = [grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (grad_x, None, None, None, *grads)


def _still_fused(module: nn.Module, weight: torch.Tensor) -> bool:
    """Every part is a plain Linear whose weight still lives in the fused tensor (storage pointers: cheap checks).
    While torch.compile traces, only the types are checked: dynamo cannot trace storage pointers (a graph break per
    projection), and a traced model was fused before compiling (`train` fuses right after moving the model)."""
    parts = [getattr(module, name) for name in type(module).FUSED_PROJECTIONS]
    if any(type(part) is not Linear for part in parts):
        return False
    if torch.compiler.is_compiling():
        return True
    storage = weight.untyped_storage().data_ptr()
    return all(part.weight.untyped_storage().data_ptr() == storage for part in parts)


def _fuse(module: nn.Module, names: tuple[str, ...]) -> None:
    parts = [getattr(module, name) for name in names]
    weights = [part.weight for part in parts]
    fused = torch.cat(weights)  # (sum of out, in)
    column_major = all(w.stride() == (1, w.shape[0]) and w.shape[0] > 1 for w in weights)
    if column_major:  # keep the layout llmkit.nn.linear's one-token path reads (use_column_major_weights)
        fused = fused.t().contiguous().t()
    sizes = [w.shape[0] for w in weights]
    for part, view in zip(parts, fused.split(sizes)):
        part.weight.data = view
    bias = None
    if parts[0].bias is not None:
        bias = torch.cat([part.bias for part in parts])  # (sum of out,)
        for part, view in zip(parts, bias.split(sizes)):
            part.bias.data = view
    module.register_buffer(FUSED_WEIGHT, fused, persistent=False)
    module.register_buffer(FUSED_BIAS, bias, persistent=False)


def _own_copy(view: torch.Tensor) -> torch.Tensor:
    """A copy of a weight view in its own storage, column-major again where the view was."""
    if view.dim() == 2 and view.stride()[0] == 1 and view.shape[0] > 1:
        return view.t().contiguous().t()
    return view.contiguous()
