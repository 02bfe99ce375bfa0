"""BLOOM (ALiBi), Phi-3, Gemma and StableLM held against `transformers`: tiny random models of each family are built
and saved here, imported by llmkit and compared logit by logit (plain, left-padded and cached decoding);
exports are loaded back with `AutoModelForCausalLM`. Error paths check the message names the field and fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from llmkit import Config, LlmkitError
from llmkit.checkpoints.hf import export_hf, load_hf
from llmkit.checkpoints.hf_config import config_from_hf, hf_architecture
from llmkit.estimate import count_parameters
from llmkit.models.decoder import Decoder
from llmkit.nn.position import alibi_slopes
from tests.helpers import load_llmkit

VOCAB = 128
MAX_POSITIONS = 64
# fp32 on both sides; the only differences are summation order in matmuls and softmax (~1e-6 here),
# while a wrong key, fused-weight split, norm offset or slope moves logits by 1e-2 or more.
TOLERANCE = 1e-4

ROPE_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},  # not the 10,000 default: the theta must be read
)

HF_BUILDERS = {
    # 6 heads: not a power of two, so the interleaved extra ALiBi slopes are used
    "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=6,
                                                  bos_token_id=1, eos_token_id=2)),
    "bloom-untied": lambda: BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=8,
                                                         tie_word_embeddings=False)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(
        **ROPE_COMMON, num_key_value_heads=2, rms_norm_eps=1e-5, original_max_position_embeddings=MAX_POSITIONS,
        sliding_window=None, attn_implementation="eager")),
    # MQA with head_dim 32: n_heads * head_dim = 128 is not d_model = 64
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(
        **ROPE_COMMON, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, attn_implementation="eager")),
    "gemma-bias-untied": lambda: GemmaForCausalLM(GemmaConfig(
        **ROPE_COMMON, num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False,
        attn_implementation="eager")),
    # partial rotary: RoPE on 4 of each head's 16 channels (StableLM's default 0.25), 12 of 16 (Phi-4-mini's 0.75)
    "stablelm": lambda: StableLmForCausalLM(StableLmConfig(
        **{**ROPE_COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}},
        num_key_value_heads=2, use_qkv_bias=True, layer_norm_eps=1e-5, attn_implementation="eager")),
    "phi3-partial": lambda: Phi3ForCausalLM(Phi3Config(
        **{**ROPE_COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.75}},
        num_key_value_heads=2, tie_word_embeddings=True, sliding_window=None, attn_implementation="eager")),
}


def randomize(model: torch.nn.Module) -> None:
    """Weights far from the HF init (which zeroes biases and sets norms to one or zero), so every tensor counts."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            parameter.normal_(mean=1.0 if is_norm and name.endswith("weight") else 0.0, std=0.1)


def save_hf(kind: str, directory: Path) -> torch.nn.Module:
    """A seeded random HF model of `kind`, saved with save_pretrained (safetensors) into `directory`."""
    torch.manual_seed(0)
    model = HF_BUILDERS[kind]().eval()
    randomize(model)
    model.save_pretrained(directory)
    return model


def token_ids(length: int = 40, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("kind", list(HF_BUILDERS))
def test_import_matches_transformers_logits(kind, tmp_path):
    hf_model = save_hf(kind, tmp_path)
    model = load_llmkit(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
    assert expected.abs().max() > 1.0  # logits carry signal, so the comparison below can fail
    assert max_difference(got, expected) <= TOLERANCE
    assert model.config.hf_architecture == type(hf_model).__name__


@pytest.mark.parametrize("kind", list(HF_BUILDERS))
def test_left_padded_batch_matches_transformers(kind, tmp_path):
    hf_model = save_hf(kind, tmp_path)
    model = load_llmkit(tmp_path)
    ids = token_ids(length=24, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :9], mask[1, :3] = 0, 0  # rows 0 and 1 are left-padded, row 2 is full
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes for left padding
    extra = {} if kind.startswith("bloom") else {"position_ids": positions}  # BLOOM builds ALiBi from the mask
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, **extra).logits
        alone = hf_model(ids[:1, 9:]).logits  # row 0 without its padding
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert max_difference(got[real], expected[real]) <= TOLERANCE  # padding rows' logits are meaningless
    assert max_difference(got[0, 9:], alone[0]) <= TOLERANCE


@pytest.mark.parametrize("kind", ["bloom", "phi3", "gemma", "stablelm"])
def test_incremental_decode_with_cache_matches_full_forward(kind, tmp_path):
    hf_model = save_hf(kind, tmp_path)
    model = load_llmkit(tmp_path)
    ids = token_ids(length=24, batch=1)
    with torch.no_grad():
        expected = hf_model(ids).logits
        cache = model.new_cache(batch_size=1, max_len=ids.shape[1])
        steps = [model(ids[:, :6], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(6, ids.shape[1])]
    assert max_difference(torch.cat(steps, dim=1), expected) <= TOLERANCE


def test_import_reads_config_fields(tmp_path):
    for kind in ("bloom", "phi3", "gemma", "stablelm"):
        save_hf(kind, tmp_path / kind)
    bloom = config_from_hf(tmp_path / "bloom")
    assert (bloom.position, bloom.embed_norm, bloom.norm, bloom.mlp, bloom.gelu_approximate, bloom.d_ff) == (
        "alibi", True, "layernorm", "gelu", "tanh", 384)
    assert (bloom.qkv_bias, bloom.out_bias, bloom.mlp_bias, bloom.tie_embeddings, bloom.n_heads) == (
        True, True, True, True, 6)
    phi3 = config_from_hf(tmp_path / "phi3")
    assert (phi3.n_kv_heads, phi3.d_ff, phi3.rope_theta, phi3.mlp, phi3.tie_embeddings) == (2, 96, 500.0, "swiglu", False)
    gemma = config_from_hf(tmp_path / "gemma")
    assert (gemma.head_dim, gemma.n_kv_heads, gemma.mlp, gemma.gelu_approximate, gemma.norm_offset) == (
        32, 1, "geglu", "tanh", 1.0)
    assert gemma.scale_embeddings and gemma.tie_embeddings and gemma.norm_eps == 1e-6
    stablelm = config_from_hf(tmp_path / "stablelm")
    assert (stablelm.norm, stablelm.qkv_bias, stablelm.out_bias, stablelm.rope_fraction, stablelm.rope_dim) == (
        "layernorm", True, False, 0.25, 4)


def test_bloom_checkpoint_without_prefix(tmp_path):
    """bigscience/bloom-560m stores BloomModel names (h.0..., word_embeddings...) without `transformer.`."""
    hf_model = save_hf("bloom", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({name.removeprefix("transformer."): tensor for name, tensor in tensors.items()},
              tmp_path / "model.safetensors")
    model = load_llmkit(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        assert max_difference(model(ids), hf_model(ids).logits) <= TOLERANCE


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64, 96, 112])
def test_alibi_slopes_match_bloom(n_heads):
    """Including head counts that are not powers of two (BLOOM-176B has 112 heads)."""
    expected = _get_alibi_slopes(n_heads, torch.device("cpu"))
    assert torch.allclose(alibi_slopes(n_heads), expected, rtol=1e-6, atol=0)


def test_gemma_embedding_scale_is_rounded_to_bfloat16(tmp_path):
    """sqrt(64) = 8 is exact in bf16: use d_model 96, where sqrt(96) = 9.798 rounds to 9.8125 in bf16."""
    torch.manual_seed(0)
    hf_model = GemmaForCausalLM(GemmaConfig(**{**ROPE_COMMON, "hidden_size": 96}, num_key_value_heads=1, head_dim=32))
    hf_model.save_pretrained(tmp_path)
    model = load_llmkit(tmp_path).to(torch.bfloat16)
    hf_model = hf_model.to(torch.bfloat16)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = token_ids()
    with torch.no_grad():
        model(ids)
        expected = hf_model.model.embed_tokens(ids)
    assert torch.equal(seen[0], expected)
    assert not torch.equal(expected, hf_model.model.embed_tokens.weight[ids] * math.sqrt(96))


# --------------------------------------------------------------------------- export parity


@pytest.mark.parametrize("kind", list(HF_BUILDERS))
def test_export_loads_in_transformers_with_same_logits(kind, tmp_path):
    hf_model = save_hf(kind, tmp_path / "in")
    model = load_llmkit(tmp_path / "in")
    export_hf(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(hf_model).__name__
    ids = token_ids()
    with torch.no_grad():
        assert max_difference(reloaded(ids).logits, hf_model(ids).logits) <= TOLERANCE
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)  # a tied head is written once
    assert set(stored) == set(load_file(tmp_path / "in" / "model.safetensors")) - {"lm_head.weight"} | (
        {"lm_head.weight"} if "lm_head.weight" in stored else set())  # the HF names, fused as HF fuses them
    _, state = load_hf(tmp_path / "out")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


NATIVE_CONFIGS = {
    "BloomForCausalLM": dict(norm="layernorm", mlp="gelu", gelu_approximate="tanh", qkv_bias=True, out_bias=True,
                             mlp_bias=True, tie_embeddings=True, position="alibi", embed_norm=True, n_heads=6,
                             d_model=96),
    "GemmaForCausalLM": dict(n_kv_heads=1, head_dim=32, mlp="geglu", gelu_approximate="tanh", tie_embeddings=True,
                             scale_embeddings=True, norm_offset=1.0),
    "StableLmForCausalLM": dict(norm="layernorm", qkv_bias=True, rope_fraction=0.5),
    "Phi3ForCausalLM": dict(n_kv_heads=2, rope_fraction=0.75, tie_embeddings=True),
}


@pytest.mark.parametrize("architecture", list(NATIVE_CONFIGS))
def test_export_native_model(architecture, tmp_path):
    """A model llmkit built itself (no HF origin) gets its family from its Config fields."""
    torch.manual_seed(0)
    config = Config(**{**dict(vocab_size=VOCAB, n_layers=2, n_heads=4, d_model=64, max_seq_len=MAX_POSITIONS),
                       **NATIVE_CONFIGS[architecture]})
    model = Decoder(config).eval()
    randomize(model)
    assert hf_architecture(config) == architecture
    export_hf(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == architecture
    ids = token_ids()
    with torch.no_grad():
        assert max_difference(reloaded(ids).logits, model(ids)) <= TOLERANCE


def test_imported_family_falls_back_when_fields_change(tmp_path):
    """A Phi-3 given q/k/v biases no longer fits Phi3ForCausalLM: it is written as the closest family that does."""
    save_hf("phi3", tmp_path)
    config = config_from_hf(tmp_path)
    assert hf_architecture(config) == "Phi3ForCausalLM"
    config.qkv_bias = True
    assert hf_architecture(config) == "Qwen2ForCausalLM"


# --------------------------------------------------------------------------- presets and errors


def test_presets_have_published_sizes():
    assert count_parameters(Config.from_name("bloom-560m")) == 559_214_592
    assert count_parameters(Config.from_name("phi-3-mini-4k")) == 3_821_079_552
    assert count_parameters(Config.from_name("gemma-2b")) == 2_506_172_416
    assert count_parameters(Config.from_name("stablelm-2-1.6b")) == 1_644_515_328


def write_config(directory: Path, kind: str, **changes) -> Path:
    data = json.loads(HF_BUILDERS[kind]().config.to_json_string())
    data.update(architectures=[type(HF_BUILDERS[kind]()).__name__], **changes)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("kind, changes, message", [
    ("bloom", dict(apply_residual_connection_post_layernorm=True),
     r"apply_residual_connection_post_layernorm=True is not supported by llmkit's BLOOM"),
    ("gemma", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor=0.5, which transformers' GemmaForCausalLM ignores"),
    ("stablelm", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                       "partial_rotary_factor": 0.25}),
     r"partial_rotary_factor=0.25 with RoPE scaling is not supported"),
    ("stablelm", dict(qk_layernorm=True), r"qk_layernorm=true is not supported by llmkit's StableLM"),
    ("stablelm", dict(use_parallel_residual=True), r"use_parallel_residual=true is not supported"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"RoPE scaling type 'longrope' is not supported"),
    ("phi3", dict(sliding_window=32), r"sliding_window=32 is smaller than max_position_embeddings=64"),
    ("gemma", dict(hidden_act="silu"), r"hidden_act='silu'; llmkit's Gemma GeGLU MLP supports gelu_pytorch_tanh"),
    ("gemma", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=true is not a causal"),
])
def test_unsupported_config_fields(kind, changes, message, tmp_path):
    with pytest.raises(LlmkitError, match=message):
        config_from_hf(write_config(tmp_path, kind, **changes))


def test_export_refuses_configs_no_family_fits(tmp_path):
    bloom_like = Config(vocab_size=VOCAB, n_layers=1, n_heads=4, d_model=64, position="alibi", norm="layernorm",
                        mlp="gelu", d_ff=128)
    with pytest.raises(LlmkitError, match=r"the closest, BloomForCausalLM, needs n_kv_heads == n_heads, head_dim \* "
                                          r"n_heads == d_model and d_ff == 4 \* d_model"):
        export_hf(Decoder(bloom_like), tmp_path)
    gemma_like = Config(vocab_size=VOCAB, n_layers=1, n_heads=4, d_model=64, norm_offset=1.0)
    with pytest.raises(LlmkitError, match=r"the closest, GemmaForCausalLM, needs scale_embeddings=True \(this "
                                          r"config has False\)"):
        export_hf(Decoder(gemma_like), tmp_path)
    with pytest.raises(LlmkitError, match=r"norm_offset=1.0 applies to RMSNorm only"):
        Config(norm="layernorm", norm_offset=1.0)
    with pytest.raises(LlmkitError, match=r"rope_fraction=0.1 rotates int\(head_dim \* rope_fraction\) = 1 channels"):
        Config(d_model=64, n_heads=4, rope_fraction=0.1)
    assert not (tmp_path / "config.json").exists()
