"""Hugging Face import/export held against `transformers` itself: tiny random models of each family
are built and saved here, imported by llmkit, and compared logit by logit; exports are loaded back
with `AutoModelForCausalLM`. Error paths check the message names the file, tensor and fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmkit.checkpoints.hf import export_hf, load_hf
from llmkit.checkpoints.hf_config import config_from_hf, hf_architecture
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer
from tests.helpers import load_llmkit

VOCAB = 128
MAX_POSITIONS = 64
# fp32 on both sides; the only differences are summation order in matmuls and softmax (~1e-6 here),
# while a wrong key, transpose, bias or rope setting moves logits by 1e-2 or more.
TOLERANCE = 1e-4

ROPE_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    attn_implementation="eager",
)
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 500.0}  # not the 10,000 default: the theta must be read


def llama(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**ROPE_COMMON, "rope_parameters": dict(DEFAULT_ROPE), **overrides}))


HF_BUILDERS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")),
    "llama": lambda: llama(num_key_value_heads=4),
    "llama-gqa": lambda: llama(num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mqa": lambda: llama(num_key_value_heads=1),
    "llama-bias": lambda: llama(num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=32),
    "llama3-rope": lambda: llama(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear-rope": lambda: llama(num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        **ROPE_COMMON, num_key_value_heads=2, sliding_window=None, rope_parameters=dict(DEFAULT_ROPE))),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        **ROPE_COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(DEFAULT_ROPE))),
}
EXPECTED_ARCHITECTURE = {
    "gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
}


def randomize(model: torch.nn.Module) -> None:
    """Weights far from the HF init (which zeroes biases and sets norms to one), so every tensor counts."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            parameter.normal_(mean=1.0 if is_norm and name.endswith("weight") else 0.0, std=0.1)


def save_hf(kind: str, directory: Path, **save_options) -> torch.nn.Module:
    """A seeded random HF model of `kind`, saved with save_pretrained (safetensors) into `directory`."""
    torch.manual_seed(0)
    model = HF_BUILDERS[kind]().eval()
    randomize(model)
    model.save_pretrained(directory, **save_options)
    return model


def token_ids(length: int = 40, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("kind", list(HF_BUILDERS))
def test_import_matches_transformers_logits(kind, tmp_path):
    hf_model = save_hf(kind, tmp_path)
    model = load_llmkit(tmp_path)
    ids = token_ids()  # 40 tokens: past llama3-rope's original 16-token context, where scaling acts
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
    assert expected.abs().max() > 1.0  # logits carry signal, so the comparison below can fail
    assert max_difference(got, expected) <= TOLERANCE
    assert model.config.hf_architecture == type(hf_model).__name__


def test_import_reads_config_fields(tmp_path):
    save_hf("llama3-rope", tmp_path / "llama3")
    save_hf("qwen2", tmp_path / "qwen2")
    save_hf("llama-mqa", tmp_path / "mqa")
    save_hf("gpt2", tmp_path / "gpt2")
    llama3 = config_from_hf(tmp_path / "llama3" / "config.json")
    assert (llama3.rope_scaling.kind, llama3.rope_scaling.factor, llama3.rope_scaling.original_max_seq_len) == (
        "llama3", 4.0, 16)
    assert (llama3.n_kv_heads, llama3.d_ff, llama3.bos_id, llama3.eos_id) == (2, 96, 1, 2)
    qwen2 = config_from_hf(tmp_path / "qwen2")
    assert (qwen2.qkv_bias, qwen2.out_bias, qwen2.mlp_bias, qwen2.tie_embeddings, qwen2.rope_theta) == (
        True, False, False, True, 500.0)
    assert config_from_hf(tmp_path / "mqa").n_kv_heads == 1
    gpt2 = config_from_hf(tmp_path / "gpt2")
    assert (gpt2.position, gpt2.norm, gpt2.gelu_approximate, gpt2.d_ff, gpt2.max_seq_len) == (
        "learned", "layernorm", "tanh", 256, MAX_POSITIONS)


def test_legacy_rope_keys_and_eos_list(tmp_path):
    """transformers 4.x configs keep rope_theta at top level and rope_scaling beside it; Llama 3 lists several EOS."""
    config = json.loads(LlamaConfig(**{**ROPE_COMMON, "attn_implementation": None}).to_json_string())
    config.pop("rope_parameters")
    config.update(architectures=["LlamaForCausalLM"], rope_theta=250000.0, eos_token_id=[7, 9],
                  rope_scaling={"type": "linear", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    imported = config_from_hf(tmp_path)
    assert imported.rope_theta == 250000.0
    assert (imported.rope_scaling.kind, imported.rope_scaling.factor) == ("linear", 8.0)
    assert imported.eos_id == 7 and imported.eos_ids == (7, 9)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "llama-mqa", "mistral", "qwen2", "llama3-rope"])
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


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = save_hf("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model = load_llmkit(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        assert max_difference(model(ids), hf_model(ids).logits) <= TOLERANCE


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2 stores GPT2Model names (h.0..., wte) plus causal-mask buffers."""
    hf_model = save_hf("gpt2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, MAX_POSITIONS, MAX_POSITIONS))
    save_file(renamed, tmp_path / "model.safetensors")
    model = load_llmkit(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        assert max_difference(model(ids), hf_model(ids).logits) <= TOLERANCE


# --------------------------------------------------------------------------- export parity


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-gqa", "llama-bias", "llama3-rope", "mistral", "qwen2"])
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
    _, state = load_hf(tmp_path / "out")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("preset, architecture", [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM")])
def test_export_native_model(preset, architecture, tmp_path):
    """A model llmkit built itself (no HF origin) gets its family from its Config fields."""
    torch.manual_seed(0)
    model = Decoder(Config.from_name(preset, max_seq_len=MAX_POSITIONS)).eval()
    randomize(model)
    assert hf_architecture(model.config) == architecture
    export_hf((model.config, model.state_dict()), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == architecture
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_difference(reloaded(ids).logits, model(ids)) <= TOLERANCE


def test_export_writes_tokenizer_transformers_reads(tmp_path):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(backend, bos_id=1, eos_id=2)
    torch.manual_seed(0)
    export_hf(Decoder(Config.from_name("tiny-llama")), tmp_path, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == [3, 4]


# --------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(LlmkitError, match=r"model directory .*nowhere does not exist; pass the folder"):
        load_hf(tmp_path / "nowhere")


def test_missing_config_json(tmp_path):
    save_hf("llama", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LlmkitError, match=r"config\.json does not exist"):
        load_hf(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(LlmkitError, match=r"FalconForCausalLM, which llmkit cannot import; supported architectures: "
                                          r"GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_hf(tmp_path)


def rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_tensor(tmp_path):
    save_hf("llama", tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LlmkitError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight missing from "
                                          r".*model\.safetensors; the checkpoint is incomplete"):
        load_hf(tmp_path)


def test_unexpected_tensor(tmp_path):
    save_hf("llama", tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"model.layers.2.mlp.up_proj.weight": torch.ones(96, 64)}))
    with pytest.raises(LlmkitError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight in .*"
                                          r"model\.safetensors.*2 layers"):
        load_hf(tmp_path)


def test_wrong_shape(tmp_path):
    save_hf("llama", tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"model.layers.0.mlp.up_proj.weight": torch.ones(100, 64)}))
    with pytest.raises(LlmkitError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \(100, 64\) in "
                                          r".*model\.safetensors, config expects \(96, 64\)"):
        load_hf(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_hf("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(LlmkitError, match=r"model\.safetensors is not a readable safetensors file .*truncated or "
                                          r"corrupt: re-download or re-export it"):
        load_hf(tmp_path)


def test_missing_shard(tmp_path):
    save_hf("llama", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(LlmkitError, match=rf"shard .*{shard.name} listed in .*index\.json is missing"):
        load_hf(tmp_path)


def test_missing_tensor_in_shard_names_the_shard(tmp_path):
    save_hf("llama", tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = tmp_path / index["weight_map"][name]
    tensors = load_file(shard)
    tensors.pop(name)
    save_file(tensors, shard)
    with pytest.raises(LlmkitError, match=rf"tensor {re.escape(name)} missing from .*{shard.name}; the checkpoint"):
        load_hf(tmp_path)


def test_pickle_only_directory_is_refused(tmp_path):
    save_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # never opened, so content is moot
    with pytest.raises(LlmkitError, match=r"only pickled PyTorch weights .*never unpickles.*Convert them to "
                                          r"model\.safetensors"):
        load_hf(tmp_path)


def test_directory_without_weights(tmp_path):
    save_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LlmkitError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"):
        load_hf(tmp_path)


def write_config(directory: Path, kind: str, **changes) -> Path:
    data = json.loads(HF_BUILDERS[kind]().config.to_json_string())
    data.update(architectures=[EXPECTED_ARCHITECTURE.get(kind, "LlamaForCausalLM")], **changes)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def test_sliding_window_smaller_than_context_is_refused(tmp_path):
    with pytest.raises(LlmkitError, match=r"sliding_window=16 is smaller than max_position_embeddings=64.*Set "
                                          r"max_position_embeddings to 16"):
        config_from_hf(write_config(tmp_path, "mistral", sliding_window=16))
    assert config_from_hf(write_config(tmp_path, "mistral", sliding_window=64)).extra["sliding_window"] == 64
    with pytest.raises(LlmkitError, match=r"sliding_window=32 is smaller"):
        config_from_hf(write_config(tmp_path, "qwen2", use_sliding_window=True, sliding_window=32, layer_types=None,
                                    max_window_layers=1))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), r"hidden_act='gelu'; llmkit's SwiGLU MLP supports only 'silu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"RoPE scaling type 'yarn' is not supported"),
    (dict(hidden_size=None), r"the config has no 'hidden_size'"),
])
def test_unsupported_config_fields(changes, message, tmp_path):
    with pytest.raises(LlmkitError, match=message):
        config_from_hf(write_config(tmp_path, "llama", **changes))


@pytest.mark.parametrize("kind, changes, message", [
    ("llama", dict(hidden_size="64"), r"hidden_size='64' is a string, but it must be an integer; fix hidden_size in "
                                      r"the file"),
    ("llama", dict(num_hidden_layers=2.5), r"num_hidden_layers=2.5 is a fractional number, but it must be an integer"),
    ("llama", dict(num_attention_heads=[4]), r"num_attention_heads=\[4\] is a list, but it must be an integer"),
    ("llama", dict(rms_norm_eps="tiny"), r"rms_norm_eps='tiny' is a string, but it must be a number"),
    ("llama", dict(rope_scaling="linear"), r"rope_scaling='linear' is a string, but it must be an object"),
    ("llama", dict(tie_word_embeddings=1), r"tie_word_embeddings=1 is an integer, but it must be true or false"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": "2"}),
     r"rope scaling factor='2' is a string, but it must be a number"),
    ("gpt2", dict(n_embd="64"), r"n_embd='64' is a string, but it must be an integer"),
    # errors Config itself finds speak the file's names, not llmkit's
    ("llama", dict(num_attention_heads=5, head_dim=None), r"config.json: config '[^']+': hidden_size=64 is not "
                                                          r"divisible by num_attention_heads=5"),
    ("llama", dict(num_hidden_layers=0), r"config.json: config '[^']+': num_hidden_layers=0 must be a positive"),
    ("gpt2", dict(n_head=5), r"n_embd=64 is not divisible by n_head=5"),
])
def test_config_json_of_the_wrong_type_names_the_key(kind, changes, message, tmp_path):
    with pytest.raises(LlmkitError, match=message) as error:
        config_from_hf(write_config(tmp_path, kind, **changes))
    assert str(error.value).startswith(str(tmp_path / "config.json"))
    assert "\n" not in str(error.value)


def test_gpt2_unsupported_activation(tmp_path):
    with pytest.raises(LlmkitError, match=r"activation_function='relu' is not supported"):
        config_from_hf(write_config(tmp_path, "gpt2", activation_function="relu"))


def test_export_refuses_configs_no_family_fits(tmp_path):
    alibi = Config.from_name("tiny-llama", position="alibi")
    with pytest.raises(LlmkitError, match=r"fits no Hugging Face architecture .*the closest, BloomForCausalLM, needs "
                                          r"n_kv_heads == n_heads"):  # ALiBi is BLOOM's; tiny-llama has GQA
        export_hf(Decoder(alibi), tmp_path)
    llama = Decoder(Config.from_name("tiny-llama"))
    state = llama.state_dict()
    state.pop("blocks.0.mlp.up_proj.weight")
    with pytest.raises(LlmkitError, match=r"tensor blocks\.0\.mlp\.up_proj\.weight is missing"):
        export_hf((llama.config, state), tmp_path)
    with pytest.raises(LlmkitError, match=r"tokenizer of type str has no save\(directory\) method"):
        export_hf(llama, tmp_path, tokenizer="not a tokenizer")
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "model.safetensors").exists()
