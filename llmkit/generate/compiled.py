"""A compiled decode step: the one-token forward of a decoder through `torch.compile` (TorchInductor).

An eager decode step of SmolLM2-135M issues ~700 small ops per token (norms, rotary, residual adds, views, the KV
write, the attention kernel), each a Python call and an aten dispatch of a few microseconds: at 135M parameters they
cost as much as reading the weights. Inductor traces the whole step once into one graph, fuses the elementwise ops
into generated C++ loops and calls the matrix kernels (fp32 GEMV, the int4/int8 weight-only kernels of llmkit.quant)
as external kernels, so a token costs one graph call plus its products. Measured in docs/benchmarks.md ("Quantized
GGUF decode").

Only the decode step is compiled: the prompt's prefill runs eagerly (one forward per request, dominated by its
matrix products), so a prompt of a new length never triggers a compilation. The step is compiled with dynamic
shapes (`dynamic=True`): the cache's growing length, the batch size and the cache size are symbols, so one
compilation serves every step of every later request. The first step pays the compilation (tens of seconds on 2
CPU cores; inductor caches the generated code on disk, so a later process starts faster).

Before each call dynamo checks its guards: that what the graph was traced for still holds. By default that includes
every attribute of every module it read (each parameter's dtype, shape and strides, each flag): ~1.2 ms per token for
SmolLM2-135M on the 2-core CPU, an eighth of a quantized step. The step is compiled without the module guards
(`torch.compiler.skip_guard_on_all_nn_modules_unsafe`): the model is taken as final when it is compiled, the way
generation uses it. Guards on the inputs and the KV cache stay (its length is a symbol; its padding flag picks a
graph). Dynamo keeps its graphs per code object, and with the module guards gone two models of one class (a float
and a quantized decoder) would share them: so each compiled step traces its own copy of the forward's code. A model
changed afterwards (cast, re-quantized, adapters merged) must be compiled again.

The graph's wrapper, which calls its ~130 generated kernels and ~150 external ops (llmkit's matrix and attention
kernels) in turn, is generated as C++ (inductor's `cpp_wrapper`) rather than Python: ~5% of a quantized SmolLM2 step
(8.6 vs 9.1 ms, interleaved A/B on the 2-core AVX2 VM, 2026-12-06), for a longer first compilation.
"""

from __future__ import annotations

import os
import shutil
import types
from collections.abc import Callable

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.generate.native_step import native_decode_step
from llmkit.nn import decode_kernels

COMPILED_STEP = "compiled_decode_step"  # the attribute `compile_decode_step` sets on a model


def compile_decode_step(model: nn.Module) -> nn.Module:
    """Give `model` a compiled one-token forward, which the decode loops (`generate_tokens`, constrained decoding)
    use for every step after the prefill; returns the model. Compilation happens at the first step.

    Inductor writes and builds C++ on CPU, so a C++ compiler must be on PATH (`CXX`, or g++ / clang++)."""
    device = next(model.parameters()).device
    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise LlmkitError("--compile needs a C++ compiler on the CPU (TorchInductor builds the decode step as C++): "
                          "install one (e.g. `apt install g++`) or run without --compile")
    decode_kernels.available()  # build llmkit's decode ops now, not inside the trace
    # the bound forward, not the module: a compiled module set as an attribute would become its own submodule
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True}
    step = torch.compile(own_code(model.forward), dynamic=True, options=options)
    object.__setattr__(model, COMPILED_STEP, step)
    return model


def own_code(method: types.MethodType) -> types.MethodType:
    """`method` bound to the same object, its function a copy with a code object of its own (dynamo's graphs and
    guards hang on the code object: a copy starts with none, and its graphs serve only this object)."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return types.MethodType(copy, method.__self__)


def decode_step(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The callable a decode loop feeds one token per row: the compiled step where `compile_decode_step` gave the
    model one, else llmkit's native step where it applies (llmkit/generate/native_step.py), else the model itself.
    Asked once per decode loop: the native step describes the model as it is then."""
    compiled = getattr(model, COMPILED_STEP, None)
    if compiled is not None:
        return compiled
    return native_decode_step(model) or model
