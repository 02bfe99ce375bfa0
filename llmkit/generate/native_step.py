"""A decoder's one-token step through all its blocks in one native call, the default decode step on the CPU.

The eager step runs each block as Python modules: SmolLM2-135M's 30 blocks are ~50 op calls, views and checks each,
~1,500 per token, and on the 2-core CPU that Python costs about as much as the products themselves (a quantized
step spends ~8 of its ~20 ms between kernels; docs/benchmarks.md). llama.cpp runs its graph from C++. Here the loop
over the blocks moves to C++ (kernels/step_cpu.cpp): a `DecodeProgram` holds each block's norms and the products
its layers describe (`DecodeProduct`: which of llmkit's kernels, on which tensors), built once per decode loop, and
`step` runs the whole stack, calling the very ops the eager modules call, in the same order: the logits are the
eager step's, bit for bit. The embedding, the rotary tables and positions (`causal_context`, as the model's forward
builds them) and the LM head stay in Python: a handful of ops per token.

It applies to a plain `Decoder` whose blocks are pre-norm RMSNorm blocks (Gemma 2/3's sandwich norms and QK-norm
included) with RoPE attention and a SwiGLU or GeGLU MLP, every projection on llmkit's decode kernels (float32 weights
stored column-major, GGUF blocks, F16/BF16 GGUF matrices), float32 activations on the CPU, a `KVCache` and at most
16 rows, no forward hooks. Anything else, a LoRA-wrapped projection, a MoE or a bfloat16 model among them, keeps the
module path (`plan` says why), as does any call outside a decode loop's conditions (`NativeDecodeStep.__call__`). The
C++ is compiled on first use like llmkit's other kernels (llmkit/extensions.py); LLMKIT_NATIVE_STEP=0 turns the step
off (the modules then run as before, for a comparison), LLMKIT_NATIVE_KERNELS=0 all of llmkit's kernels.
`torch.compile`'s step (llmkit/generate/compiled.py), where asked for, takes precedence.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from llmkit.extensions import try_build_ops
from llmkit.models.decoder import Decoder
from llmkit.nn import decode_kernels
from llmkit.nn.attention import Attention, KVCache, causal_context
from llmkit.nn.block import Block
from llmkit.nn.fused import decode_products, layer_product
from llmkit.nn.mlp import GeGLU, SwiGLU
from llmkit.nn.norm import RMSNorm

SOURCE = Path(__file__).parent / "kernels" / "step_cpu.cpp"
OPS = "llmkit_step"
# the C++ file's Kernel, Role and Activation enums
KERNELS = {f"{decode_kernels.OPS}::linear": 0, "llmkit_gguf::matmul": 1, "llmkit_gguf::matmul_x8": 2,
           "llmkit_gguf::matmul_float": 3}
QKV, OUT, GATE_UP, DOWN = range(4)
ACTIVATIONS = {("swiglu", "none"): 0, ("swiglu", "tanh"): 0, ("swiglu", "quick"): 0, ("geglu", "tanh"): 1,
               ("geglu", "none"): 2}

_built: bool | None = None  # None: not tried yet


def available() -> bool:
    """Whether the step op is built and loaded (building it, and llmkit's decode ops it calls, on the first call)."""
    global _built
    if _built is None:
        _built = os.environ.get("LLMKIT_NATIVE_STEP", "1") != "0" and decode_kernels.available() and try_build_ops(
            OPS, [SOURCE], what="decode step", fallback="decode steps run module by module")
    return _built


def plan(model: nn.Module) -> tuple[torch.ScriptObject | None, str]:
    """(the model's `DecodeProgram`, "") where the native step applies to `model` (module docstring), else (None,
    why not)."""
    if type(model) is not Decoder:
        return None, f"{type(model).__name__} is not a plain Decoder"
    config = model.config
    reasons = [
        (config.position != "rope", f"positions {config.position!r} (RoPE only)"),
        (config.norm != "rmsnorm" or config.post_norm or config.embed_norm, "a norm other than pre-norm RMSNorm"),
        ((config.mlp, config.gelu_approximate) not in ACTIVATIONS or config.n_experts, f"MLP {config.mlp!r}"),
        (bool(config.recurrent_layers), "a sequence mixer other than attention"),
        (model.kernel != "sdpa", f"attention kernel {model.kernel!r}"),
        (model.activation_dtype_device() != (torch.float32, torch.device("cpu")), "activations not float32 on the CPU"),
        (not available(), "llmkit's decode kernels are not built"),
    ]
    for failed, reason in reasons:
        if failed:
            return None, reason
    hooked = [name or "the model" for name, module in model.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    if hooked or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None, f"forward hooks on {', '.join(hooked) or 'every module'} (the native step calls no module)"
    eps, offset = config.norm_eps, config.norm_offset
    scale = model.blocks[0].attn.scale
    program = torch.classes.llmkit_step.DecodeProgram(
        config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff, eps, offset,
        scale if scale is not None else config.head_dim**-0.5, ACTIVATIONS[config.mlp, config.gelu_approximate])
    for index, block in enumerate(model.blocks):
        why = _add_block(program, block, eps, offset)
        if why:
            return None, f"block {index}: {why}"
    return program, ""


def _add_block(program: torch.ScriptObject, block: nn.Module, eps: float, offset: float) -> str:
    """Add `block`'s norms and products to `program`; "" when done, else why it cannot be."""
    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) not in (SwiGLU, GeGLU):
        return "not a pre-norm attention block with a gated MLP"
    if not (isinstance(block.attn_adapter, nn.Identity) and isinstance(block.mlp_adapter, nn.Identity)):
        return "bottleneck adapters"
    attn = block.attn
    norms = [block.attn_norm, block.mlp_norm, block.post_attn_norm, block.post_mlp_norm, attn.q_norm, attn.k_norm]
    for norm in norms[:2] + [norm for norm in norms[2:] if norm is not None]:
        if type(norm) is not RMSNorm or norm.weight.dtype != torch.float32 or (norm.eps, norm.offset) != (eps, offset):
            return "a norm other than the config's float32 RMSNorm"
    products = {QKV: decode_products(attn), OUT: _single(attn.o_proj), GATE_UP: decode_products(block.mlp),
                DOWN: _single(block.mlp.down_proj)}
    if any(parts is None or any(part.op not in KERNELS for part in parts) for parts in products.values()):
        return "a projection that does not run on llmkit's decode kernels"
    program.add_layer(*[None if norm is None else norm.weight for norm in norms], attn.window, attn.sliding)
    for role, parts in products.items():
        for part in parts:
            program.add_product(role, KERNELS[part.op], part.weight, part.bias, part.kind, part.out_features)
    return ""


def _single(layer: nn.Module) -> list[decode_kernels.DecodeProduct] | None:
    product = layer_product(layer)
    return None if product is None else [product]


class NativeDecodeStep:
    """The decode step of a model `plan` accepted: called as the model is in a decode loop, `step(input_ids (B, 1),
    cache=cache)` -> logits (B, 1, vocab). A call the program does not cover (more than 16 rows, a cache other than a
    `KVCache`, autograd or autocast on) runs the model itself."""

    def __init__(self, model: Decoder, program: torch.ScriptObject) -> None:
        self.model, self.program = model, program

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        model = self.model
        batch_size, n_tokens = input_ids.shape
        if (n_tokens != 1 or not isinstance(cache, KVCache) or batch_size > decode_kernels.MAX_ROWS
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return model(input_ids, cache=cache)
        x = model.embed(input_ids)  # (B, 1, C)
        context = causal_context(model.config, batch_size, 1, cache, inv_freq=model.inv_freq,
                                 local_inv_freq=model.local_inv_freq, device=x.device)  # claims the cache slot
        if model.config.scale_embeddings:  # as Decoder.hidden_states
            x = x * torch.tensor(model.config.d_model**0.5, dtype=x.dtype)
        local = context.local
        x = self.program.step(x, cache.keys, cache.values, context.start, cache.valid if cache.has_padding else None,
                              context.cos, context.sin, local.cos if local else None, local.sin if local else None)
        return model.head(x)  # (B, 1, vocab)


def native_decode_step(model: nn.Module) -> NativeDecodeStep | None:
    """The native step for `model`, or None where `plan` finds it does not apply."""
    program, _ = plan(model)
    return None if program is None else NativeDecodeStep(model, program)
