"""QLoRA = NF4 base + LoRA: its forward is LoRA on the dequantised weights, only the adapters train, the adapter file
holds only A and B and loads back onto a freshly quantised base, bad settings are refused with the fix named."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.peft.core import count_parameters, load_trained_tensors, read_adapter, save_adapter, trainable_state_dict
from llmkit.peft.lora import LoraLinear, LoraSettings, apply_lora, merge_lora
from llmkit.peft.qlora import QLoraSettings, apply_qlora
from llmkit.quant.nf4 import NF4Linear, nf4_memory_report
from tests.helpers import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
# fp32 on both sides with the same numbers: only the summation order differs (~1e-6 on logits of size ~1), while a
# missing adapter, a wrong scale or an undequantised weight moves them by 1e-2 or more.
TOLERANCE = 1e-5


def randomize_adapters(model: torch.nn.Module) -> None:
    """B starts at zero, which would hide the adapter path: give every A and B random values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(std=0.2)


def test_qlora_equals_lora_on_the_dequantised_weights():
    model = tiny_decoder()
    plain = copy.deepcopy(model)
    settings = QLoraSettings(rank=4, alpha=8.0)
    apply_qlora(model, settings)
    randomize_adapters(model)
    quantized = {name.removesuffix(".base"): module for name, module in model.named_modules()
                 if isinstance(module, NF4Linear)}
    assert len(quantized) == 2 * 7 and all(isinstance(model.get_submodule(name), LoraLinear) for name in quantized)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        original = plain(ids)
        for name, module in quantized.items():
            plain.get_submodule(name).weight.copy_(module.dequantized_weight())
    apply_lora(plain, LoraSettings(rank=4, alpha=8.0))
    load_trained_tensors(plain, trainable_state_dict(model), "the QLoRA model")  # the same A and B, by name
    with torch.no_grad():
        qlora_logits, reference = model(ids), plain(ids)
    assert (qlora_logits - reference).abs().max() < TOLERANCE
    assert (qlora_logits - original).abs().max() > 1e-2  # the quantisation and the adapters really act


def test_only_the_adapters_get_gradients():
    model = apply_qlora(tiny_decoder(), QLoraSettings(rank=4, targets=("q_proj", "v_proj")))
    randomize_adapters(model)
    codes_before = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("weight_codes")}
    ids = torch.randint(0, 256, (2, 12))
    loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, parameter in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert parameter.requires_grad == is_adapter, name
        assert (parameter.grad is not None) == is_adapter, name
        if is_adapter and ".lora_A." in name:
            assert parameter.grad.abs().sum() > 0, name
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)  # 2 layers x rank 4 x (in + out) of q (64->64), v (64->32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    for name, buffer in model.named_buffers():
        if name in codes_before:
            assert torch.equal(buffer, codes_before[name]), name  # the NF4 base never changes


def test_bfloat16_compute_is_close_to_float32():
    fp32 = apply_qlora(tiny_decoder(), QLoraSettings(rank=4))
    bf16 = apply_qlora(tiny_decoder(), QLoraSettings(rank=4, compute_dtype="bfloat16"))
    randomize_adapters(fp32)
    load_trained_tensors(bf16, trainable_state_dict(fp32), "the fp32 QLoRA model")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids)
    assert b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # bf16 matmuls: 8 mantissa bits, ~1% on these logits


def test_adapter_round_trip_holds_only_lora_tensors(tmp_path):
    settings = QLoraSettings(rank=4, alpha=4.0, compute_dtype="float32")
    model = apply_qlora(tiny_decoder(), settings)
    randomize_adapters(model)
    save_adapter(model, tmp_path, "qlora", settings)
    method, saved_settings, tensors = read_adapter(tmp_path)
    assert method == "qlora" and all(".lora_A." in name or ".lora_B." in name for name in tensors)
    assert len(tensors) == 2 * 2 * 7
    assert QLoraSettings(**saved_settings) == settings  # JSON lists come back as tuples
    reloaded = apply_qlora(tiny_decoder(), QLoraSettings(**saved_settings))
    load_trained_tensors(reloaded, tensors, tmp_path)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))  # the same float base quantises to the same codes


def test_memory_report_counts_the_nf4_base():
    model = apply_qlora(tiny_decoder(), QLoraSettings(rank=4))
    report = nf4_memory_report(model)
    assert 4.127 < report["bits_per_quantized_parameter"] < 4.2
    assert report["model_bytes_nf4"] < report["model_bytes_bf16"]


def test_bad_settings_name_the_fix():
    with pytest.raises(LlmkitError, match="DoRA needs the float weight.*QLoRA without DoRA"):
        QLoraSettings(dora=True)
    with pytest.raises(LlmkitError, match="compute_dtype='float16' is unknown; choose one of float32, bfloat16"):
        QLoraSettings(compute_dtype="float16")
    with pytest.raises(LlmkitError, match="LoRA rank=0 must be a positive integer"):
        QLoraSettings(rank=0)
    with pytest.raises(LlmkitError, match="block_size must be an even integer"):
        apply_qlora(tiny_decoder(), QLoraSettings(block_size=3))
    model = apply_qlora(tiny_decoder(), QLoraSettings())
    with pytest.raises(LlmkitError, match="already quantised"):
        apply_qlora(model, QLoraSettings())
    with pytest.raises(LlmkitError, match="merging LoRA needs the float weight of blocks.0.attn.q_proj.*NF4Linear"):
        merge_lora(model)  # an NF4 base cannot absorb B A without requantising: keep the adapter separate
