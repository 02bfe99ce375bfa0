"""fuse_projections: q/k/v and gate/up as one product each, with checkpoints, LoRA, quantization and dtype changes
seeing the separate projections as before; pack_bfloat16_weights: oneDNN-packed bf16 copies for one-token steps."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkit.generate import SamplingSettings, generate_tokens
from llmkit.nn.fused import (
    FUSED_WEIGHT,
    fuse_projections,
    pack_bfloat16_weights,
    unfuse_projections,
    use_onednn_for_prompts,
)
from llmkit.nn.linear import use_column_major_weights
from llmkit.peft.lora import apply_lora, merge_and_unload
from llmkit.peft.settings import LoraSettings
from tests.helpers import tiny_decoder

# fp32: the fused product sums the same terms per output in the kernel's own blocking; differences stay at rounding
FP32_TOLERANCE = 1e-5

VARIANTS = {
    "llama": dict(preset="tiny-llama"),  # GQA, RoPE, SwiGLU
    "llama-tied": dict(preset="tiny-llama", tie_embeddings=True),  # the LM head is the embedding (SmolLM2)
    "qwen2-bias": dict(preset="tiny-llama", qkv_bias=True),  # q/k/v biases are fused too
    "gemma-geglu": dict(preset="tiny-llama", mlp="geglu", gelu_approximate="tanh"),
    "gpt2": dict(preset="tiny-gpt2"),  # MHA, learned positions, GELU MLP (nothing to fuse in the MLP)
    # Gemma 3: QK-norm between the fused product and the rotation, local layers with their own RoPE base
    "gemma3-qk-norm": dict(preset="tiny-llama", qk_norm=True, post_norms=True, layer_types=("local", "global"),
                           sliding_window=4, rope_local_theta=500.0),
}

# oneDNN's bfloat16 reorder needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere can_pack is False and nothing packs
ONEDNN_BF16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                 reason="this CPU has no oneDNN bfloat16 path (AVX2 only): bf16 weights stay unpacked")


def model_pair(variant: str, column_major: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random model twice: unfused, and fused (column-major as load_model lays weights out)."""
    fields = dict(VARIANTS[variant])
    preset = fields.pop("preset")
    plain, fused = tiny_decoder(preset, **fields), tiny_decoder(preset, **fields)
    if fields.get("qkv_bias"):  # biases start at zero: make them count
        with torch.no_grad():
            for model in (plain, fused):
                torch.manual_seed(1)
                for block in model.blocks:
                    for part in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                        part.bias.normal_()
    if column_major:
        use_column_major_weights(plain)
        use_column_major_weights(fused)
    return plain, fuse_projections(fused)


def decode_logits(model: torch.nn.Module, ids: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Logits of a prefill, then of `n_steps` one-token decode steps (fixed tokens) through the KV cache."""
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + n_steps)
        out = [model(ids, cache=cache)]
        for step in range(n_steps):
            out.append(model(ids[:, step : step + 1], cache=cache))
    return torch.cat(out, dim=1)  # (B, T + n_steps, V)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", [1, 2])  # 2 threads: the one-token slab path of llmkit.nn.linear
def test_fused_logits_equal_unfused(variant, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain, fused = model_pair(variant)
        ids = torch.randint(0, 256, (2, 7))
        expected, got = decode_logits(plain, ids, 5), decode_logits(fused, ids, 5)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def test_fused_model_runs_one_product_per_group():
    plain, fused = model_pair("llama")
    calls = []
    for model in (plain, fused):
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")):
                module.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    with torch.inference_mode():
        plain(torch.tensor([[1, 2, 3]]))
        n_plain = len(calls)
        calls.clear()
        fused(torch.tensor([[1, 2, 3]]))
    assert n_plain == 2 * 7
    assert sorted(calls) == sorted(f"blocks.{i}.{part}" for i in range(2) for part in ("attn.o_proj", "mlp.down_proj"))
    # the fused weights hold the parts' memory: no second copy of the weights
    attn = fused.blocks[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == getattr(attn, FUSED_WEIGHT).untyped_storage().data_ptr()


def test_greedy_tokens_equal_after_fusing():
    plain, fused = model_pair("llama")
    prompt = [5, 17, 42, 99, 3]
    settings = SamplingSettings()  # greedy
    expected = [step[0] for step in generate_tokens(plain, prompt, max_new_tokens=8, settings=settings)]
    assert [step[0] for step in generate_tokens(fused, prompt, max_new_tokens=8, settings=settings)] == expected


def test_state_dict_keeps_the_separate_names_and_loads_into_the_fused_product(tmp_path):
    plain, fused = model_pair("qwen2-bias")
    state = fused.state_dict()
    assert state.keys() == plain.state_dict().keys()  # q_proj/k_proj/v_proj, no fused buffer saved
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    # another model's weights loaded into the fused one reach the fused product (load_state_dict copies into views)
    other, _ = model_pair("qwen2-bias")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    fused.load_state_dict(other.state_dict())
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(other, ids, 3), atol=FP32_TOLERANCE,
                               rtol=FP32_TOLERANCE)
    # and the saved file loads into an unfused model with the logits the fused model gave
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    _, reference = model_pair("qwen2-bias")
    torch.testing.assert_close(decode_logits(plain, ids, 3), decode_logits(reference, ids, 3), atol=FP32_TOLERANCE,
                               rtol=FP32_TOLERANCE)


def test_lora_on_a_fused_model_equals_lora_on_the_unfused_one_and_merges_into_the_fused_weight():
    plain, fused = model_pair("llama")
    settings = LoraSettings(rank=4, targets=("q_proj", "v_proj", "up_proj"))
    for model in (plain, fused):
        torch.manual_seed(3)
        apply_lora(model, settings)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_()
    ids = torch.randint(0, 256, (1, 6))
    # the adapted projections are LoraLinears now: their groups run unfused, with the adapter
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(plain, ids, 3), atol=FP32_TOLERANCE,
                               rtol=FP32_TOLERANCE)
    merge_and_unload(plain)
    merge_and_unload(fused)  # merges in place into the views: the fused product carries the adapter again
    attn = fused.blocks[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == getattr(attn, FUSED_WEIGHT).untyped_storage().data_ptr()
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(plain, ids, 3), atol=FP32_TOLERANCE,
                               rtol=FP32_TOLERANCE)


def test_dtype_change_after_fusing_falls_back_to_the_converted_parts():
    plain, fused = model_pair("llama")
    plain.to(torch.bfloat16)
    fused.to(torch.bfloat16)  # replaces each parameter's tensor: the stale fused copy must not be used
    with torch.no_grad():
        fused.blocks[0].attn.k_proj.weight.mul_(2)
        plain.blocks[0].attn.k_proj.weight.mul_(2)
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(plain, ids, 3), atol=0, rtol=0)


def test_unfuse_gives_each_part_its_own_storage_and_the_same_outputs():
    plain, fused = model_pair("qwen2-bias")
    unfuse_projections(fused)
    attn = fused.blocks[0].attn
    assert getattr(attn, FUSED_WEIGHT) is None
    pointers = {attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr(),
                attn.v_proj.weight.untyped_storage().data_ptr()}
    assert len(pointers) == 3
    assert attn.q_proj.weight.stride() == (1, attn.q_proj.weight.shape[0])  # column-major again
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(plain, ids, 3), atol=0, rtol=0)
    fuse_projections(fused)  # and fuses again
    assert getattr(attn, FUSED_WEIGHT) is not None
    torch.testing.assert_close(decode_logits(fused, ids, 3), decode_logits(plain, ids, 3), atol=FP32_TOLERANCE,
                               rtol=FP32_TOLERANCE)


def test_quantized_projections_are_left_unfused():
    from llmkit.quant import quantize

    plain, _ = model_pair("llama", column_major=False)
    quantize(plain, "int8", targets=("q_proj", "k_proj", "v_proj"))
    fuse_projections(plain)
    assert getattr(plain.blocks[0].attn, FUSED_WEIGHT, None) is None  # QuantLinears keep separate products
    assert getattr(plain.blocks[0].mlp, FUSED_WEIGHT) is not None  # the float gate/up still fuse


# bf16: oneDNN's kernel on the packed layout may block the sums differently than F.linear's; outputs round to bf16
BF16_TOLERANCE = 2e-2


def packed_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same bf16 model twice: as built, and fused + packed as load_decoder prepares it for decoding."""
    plain, fused = model_pair("llama-tied")
    return plain.to(torch.bfloat16), pack_bfloat16_weights(fuse_projections(fused.to(torch.bfloat16)))


def count_packed_products(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with torch.profiler.profile() as profiler:
        decode_logits(model, ids, 1)
    return sum(event.count for event in profiler.key_averages() if event.key == "mkldnn::_linear_pointwise")


@ONEDNN_BF16
def test_packed_bfloat16_decode_equals_the_unpacked_one():
    plain, packed = packed_pair()
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(packed, ids, 4), decode_logits(plain, ids, 4), atol=BF16_TOLERANCE,
                               rtol=BF16_TOLERANCE)
    # one-token steps use the packed copies: per layer q/k/v, o, gate/up and down, plus the tied head
    assert packed.head_packed is not None
    assert count_packed_products(packed, ids) == 2 * 4 + 1
    assert count_packed_products(plain, ids) == 0
    prompt = [5, 17, 42, 99, 3]
    expected = [step[0] for step in generate_tokens(plain, prompt, max_new_tokens=6)]
    assert [step[0] for step in generate_tokens(packed, prompt, max_new_tokens=6)] == expected


@ONEDNN_BF16
def test_a_weight_changed_after_packing_is_used_as_it_is():
    plain, packed = packed_pair()
    with torch.no_grad():
        for model in (plain, packed):
            model.blocks[1].attn.o_proj.weight.mul_(-3)
            model.blocks[0].mlp.up_proj.weight.add_(0.5)  # a part of the fused gate/up
            model.embed.weight.mul_(2)  # the tied head
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(packed, ids, 2), decode_logits(plain, ids, 2), atol=BF16_TOLERANCE,
                               rtol=BF16_TOLERANCE)
    assert count_packed_products(packed, ids) == 2 * 4 + 1 - 3  # the three changed matrices run unpacked


def test_a_copy_of_a_packed_model_runs_unpacked_with_the_same_outputs():
    _, packed = packed_pair()
    copied = copy.deepcopy(packed)  # oneDNN's opaque tensors cannot be copied
    assert copied.blocks[0].attn.o_proj.packed is None and copied.head_packed is None
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(decode_logits(copied, ids, 2), decode_logits(packed, ids, 2), atol=BF16_TOLERANCE,
                               rtol=BF16_TOLERANCE)
    assert count_packed_products(copied, ids) == 0


@pytest.mark.slow
def test_smollm2_decodes_the_same_prepared_and_unprepared(smollm2_float, smollm2_tokenizer):
    """Real weights: SmolLM2-135M-Instruct as load_model gives it vs fused (fp32) and fused + packed (bf16), as
    load_decoder prepares it for generation: the same greedy tokens, logits within rounding. (A deep copy of the
    session's load_model: this test fuses and casts it in place.)"""
    model, tokenizer = copy.deepcopy(smollm2_float), smollm2_tokenizer
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    prompt = ids[0].tolist()

    def greedy(m: torch.nn.Module) -> list[int]:
        return [step[0] for step in generate_tokens(m, prompt, max_new_tokens=8)]

    expected_logits, expected_tokens = decode_logits(model, ids, 4), greedy(model)
    fuse_projections(model)
    torch.testing.assert_close(decode_logits(model, ids, 4), expected_logits, atol=1e-4, rtol=1e-4)
    assert greedy(model) == expected_tokens
    unfuse_projections(model).to(torch.bfloat16)
    expected_logits, expected_tokens = decode_logits(model, ids, 4), greedy(model)
    pack_bfloat16_weights(fuse_projections(model))
    packs = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # an AVX2-only CPU: nothing packs (can_pack), same logits
    assert count_packed_products(model, ids) == (30 * 4 + 1 if packs else 0)
    # bf16 logits of magnitude ~20 are spaced 0.125 apart: a different blocking of the sums may move one step
    torch.testing.assert_close(decode_logits(model, ids, 4).float(), expected_logits.float(), atol=0.25, rtol=0.02)
    assert greedy(model) == expected_tokens


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("variant", ["llama-tied", "qwen2-bias", "gpt2"])
def test_onednn_prompts_run_every_many_row_product_on_onednn(variant, monkeypatch):
    """use_onednn_for_prompts (what load_decoder does): a prompt's products, fused and not, and the tied head over
    every position, go to oneDNN under inference mode with the model's logits within float32 rounding; decode
    steps (llmkit's one-row kernels) and forwards under no_grad never do."""
    import llmkit.nn.linear as linear_module

    plain, fused = model_pair(variant)
    use_onednn_for_prompts(fused)
    calls = []
    real = linear_module.prompt_product
    monkeypatch.setattr(linear_module, "prompt_product", lambda *args: calls.append(1) or real(*args))
    ids = torch.randint(0, 256, (2, 9))
    expected, got = decode_logits(plain, ids, 3), decode_logits(fused, ids, 3)
    # per block: q|k|v, o, gate|up (GPT-2: fc), down (GPT-2: proj); then the head over the prompt; decode steps: none
    assert len(calls) == 4 * len(fused.blocks) + 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    calls.clear()
    with torch.no_grad():
        fused(ids)
    assert calls == []
