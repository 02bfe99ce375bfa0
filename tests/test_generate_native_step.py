"""The native decode step (llmkit/generate/native_step.py): the whole stack of blocks in one C++ call gives the eager
step's logits and KV cache bit for bit, for float and GGUF-quantized layers, fused or not, with left padding, QK-norm,
sandwich norms and sliding-window layers; models it does not cover keep the module path and `plan` says why."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_decoder

from llmkit.generate import decode_step, generate_tokens
from llmkit.generate.native_step import NativeDecodeStep, available, native_decode_step, plan
from llmkit.nn.fused import decode_products, fuse_projections
from llmkit.nn.linear import use_column_major_weights
from llmkit.peft.lora import apply_lora
from llmkit.peft.settings import LoraSettings
from llmkit.quant import native, quantize
from llmkit.quant.fused import fuse_quantized_projections

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not available(), reason="llmkit's C++ decode step did not build here")]

VARIANTS = {
    "llama": dict(preset="tiny-llama"),  # GQA, RoPE, SwiGLU
    "qwen2-bias": dict(preset="tiny-llama", qkv_bias=True),  # q/k/v biases
    "gemma-geglu": dict(preset="tiny-llama", mlp="geglu", gelu_approximate="tanh", tie_embeddings=True),
    # Gemma 3: QK-norm, sandwich norms, local layers with their own RoPE base, (1 + w) norms, scaled embeddings
    "gemma3": dict(preset="tiny-llama", mlp="geglu", gelu_approximate="tanh", qk_norm=True, post_norms=True,
                   layer_types=("local", "global"), sliding_window=4, rope_local_theta=500.0, norm_offset=1.0,
                   scale_embeddings=True),
}
KERNEL_OPS = {"q4_0": "llmkit_gguf::matmul_x8", "q8_0": "llmkit_gguf::matmul_x8", "q5_0": "llmkit_gguf::matmul",
              "f16": "llmkit_nn::linear"}
PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [7, 8, 200]]  # left padding in the second row


def float_model(variant: str, fused: bool = True) -> torch.nn.Module:
    """A random model of `variant`, weights column-major as the loaders store them, q/k/v and gate/up fused or not."""
    fields = dict(VARIANTS[variant])
    model = use_column_major_weights(tiny_decoder(fields.pop("preset"), seed=3, **fields))
    with torch.no_grad():  # biases and norm weights start at zero / one: make them count
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return fuse_projections(model) if fused else model


def hooked(model: torch.nn.Module) -> torch.nn.Module:
    model.blocks[1].mlp.register_forward_hook(lambda module, inputs, output: output * 2)
    return model


def steps(model: torch.nn.Module, step, prompts: list[list[int]], n_steps: int = 6):  # noqa: ANN001, ANN201
    """Logits (B, n_steps, V) of `n_steps` fixed tokens fed by `step` after the prompts' prefill, and the cache."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(row)) + row for row in prompts])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in prompts])
    fed = torch.randint(0, model.config.vocab_size, (len(prompts), n_steps), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), longest + n_steps)
        model(ids, cache=cache, attention_mask=mask)
        logits = torch.cat([step(fed[:, i : i + 1], cache=cache) for i in range(n_steps)], dim=1)
    return logits, cache


def assert_same_as_eager(model: torch.nn.Module, prompts: list[list[int]] = PROMPTS) -> None:
    program, why = plan(model)
    assert program is not None, why
    eager_logits, eager_cache = steps(model, model, prompts)
    native_logits, native_cache = steps(model, NativeDecodeStep(model, program), prompts)
    assert torch.equal(native_logits, eager_logits)  # the same ops on the same tensors in the same order
    for layer in range(model.config.n_layers):
        assert torch.equal(native_cache.keys[layer], eager_cache.keys[layer])
        assert torch.equal(native_cache.values[layer], eager_cache.values[layer])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float_step_equals_eager(variant: str, fused: bool) -> None:
    assert_same_as_eager(float_model(variant, fused))


def test_bfloat16_cache_and_one_row() -> None:
    model = float_model("gemma3")
    model.kv_dtype = torch.bfloat16
    assert_same_as_eager(model, PROMPTS[:1])


@pytest.mark.skipif(not native.native_kernels_available(), reason="llmkit's GGUF kernels did not build here")
@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", "q5_0", "f16"])  # 8-row kernel, 8-row, row kernel, float op
@pytest.mark.parametrize("fused", [True, False])
def test_quantized_step_equals_eager(scheme: str, fused: bool) -> None:
    model = quantize(float_model("qwen2-bias", fused=False), scheme)
    model = fuse_quantized_projections(model) if fused else model
    products = decode_products(model.blocks[0].attn)
    assert [product.op for product in products] == [KERNEL_OPS[scheme]] * (1 if fused else 3)
    assert all(product.bias is not None for product in products)
    assert_same_as_eager(model)


def test_generate_uses_the_native_step_and_its_tokens_are_the_modules() -> None:
    model = float_model("llama")
    assert isinstance(decode_step(model), NativeDecodeStep)
    tokens = list(generate_tokens(model, PROMPTS, max_new_tokens=10))  # greedy
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(row)) + row for row in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in PROMPTS])
    with torch.inference_mode():  # the same greedy loop through the modules
        cache = model.new_cache(len(PROMPTS), longest + 10)
        logits = model(ids, cache=cache, attention_mask=mask)[:, -1]
        expected = []
        for _ in range(10):
            next_ids = logits.argmax(-1)
            expected.append(next_ids.tolist())
            logits = model(next_ids[:, None], cache=cache)[:, -1]
    assert tokens == expected


def test_a_call_outside_the_program_runs_the_model() -> None:
    model = float_model("llama")
    step = native_decode_step(model)
    prompts = [[1 + row, 2, 3] for row in range(17)]  # 17 rows: more than the kernels take per call
    native_logits, _ = steps(model, step, prompts, n_steps=2)
    eager_logits, _ = steps(model, model, prompts, n_steps=2)
    assert torch.equal(native_logits, eager_logits)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: tiny_decoder(), "projection"),  # row-major weights: F.linear, not llmkit's slab op
    (lambda: apply_lora(float_model("llama"), LoraSettings(rank=4)), "projection"),
    (lambda: float_model("llama").to(torch.bfloat16), "float32"),
    (lambda: use_column_major_weights(tiny_decoder("tiny-moe")), "MLP"),
    (lambda: use_column_major_weights(tiny_decoder("tiny-gpt2")), "positions"),
    (lambda: quantize(float_model("llama", fused=False), "int4", group_size=32), "projection"),  # aten's kernel
    (lambda: hooked(float_model("llama")), "hooks on blocks.1.mlp"),  # a hook would not fire: keep the modules
])
def test_models_it_does_not_cover_keep_the_module_path(make, reason: str) -> None:  # noqa: ANN001
    model = make()
    program, why = plan(model)
    assert program is None and reason in why
    assert decode_step(model) is model


@pytest.mark.slow
def test_real_smollm2_q4_1_step_equals_eager() -> None:
    """SmolLM2-135M-Instruct's shipped Q4_1 GGUF as `llmkit generate` loads it: blocks kept, q/k/v and gate/up fused
    on the 8-row kernel."""
    from llmkit.commands.common import load_decoder, model_path

    assert_same_as_eager(load_decoder(model_path(None)), [[1, 504, 3458, 282, 4649, 314], [1, 504]])
