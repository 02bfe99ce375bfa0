"""Hugging Face T5 checkpoints (T5ForConditionalGeneration) in: config.json -> Config, and one explicit key map.

Both layouts load: T5 v1.0 (feed_forward_proj "relu", LM head tied to the shared embedding and fed the decoder
output times d_model**-0.5) and T5 v1.1 / FLAN-T5 ("gated-gelu", an untied head, no rescaling). The head is
untied when the file stores an `lm_head.weight` that differs from `shared.weight`, as transformers decides.
Weights are read with `safetensors` only. `load_seq2seq` also opens llmkit checkpoints of a seq2seq model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llmkit.checkpoints.hf import _tensor_locations
from llmkit.checkpoints.hf_config import ARCHITECTURE_KEY, CONFIG_FILE
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.seq2seq import Seq2Seq

T5 = "T5ForConditionalGeneration"
T5_MODEL_TYPE = "t5"
# feed_forward_proj -> (llmkit mlp, gelu_approximate); transformers maps "gated-gelu" to gelu_new (tanh)
T5_FEED_FORWARD = {"relu": ("relu", "none"), "gated-gelu": ("geglu", "tanh"), "gated-silu": ("swiglu", "none")}
SHARED = "shared.weight"
HEAD = "lm_head.weight"
# Copies of the shared embedding some exporters write, and a table transformers itself ignores on load.
SKIPPED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# HF module name -> llmkit module name; "{i}" is the layer index. Parameter suffixes carry over.
ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
FEED_FORWARD = {"wi": "up_proj", "wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
T5_MODULES = {
    "shared": "embed",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias": "encoder.relative_bias",
    **{f"encoder.block.{{i}}.layer.0.SelfAttention.{hf}": f"encoder.blocks.{{i}}.attn.{name}"
       for hf, name in ATTENTION.items()},
    "encoder.block.{i}.layer.0.layer_norm": "encoder.blocks.{i}.attn_norm",
    **{f"encoder.block.{{i}}.layer.1.DenseReluDense.{hf}": f"encoder.blocks.{{i}}.mlp.{name}"
       for hf, name in FEED_FORWARD.items()},
    "encoder.block.{i}.layer.1.layer_norm": "encoder.blocks.{i}.mlp_norm",
    "encoder.final_layer_norm": "encoder.final_norm",
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias": "decoder.relative_bias",
    **{f"decoder.block.{{i}}.layer.0.SelfAttention.{hf}": f"decoder.blocks.{{i}}.attn.{name}"
       for hf, name in ATTENTION.items()},
    "decoder.block.{i}.layer.0.layer_norm": "decoder.blocks.{i}.attn_norm",
    **{f"decoder.block.{{i}}.layer.1.EncDecAttention.{hf}": f"decoder.blocks.{{i}}.cross_attn.{name}"
       for hf, name in ATTENTION.items()},
    "decoder.block.{i}.layer.1.layer_norm": "decoder.blocks.{i}.cross_attn_norm",
    **{f"decoder.block.{{i}}.layer.2.DenseReluDense.{hf}": f"decoder.blocks.{{i}}.mlp.{name}"
       for hf, name in FEED_FORWARD.items()},
    "decoder.block.{i}.layer.2.layer_norm": "decoder.blocks.{i}.mlp_norm",
    "decoder.final_layer_norm": "decoder.final_norm",
    "lm_head": "lm_head",
}


def t5_config_from_hf(path: str | Path, tie_embeddings: bool = True) -> Config:
    """A seq2seq `Config` from a T5 config.json (the file or its directory). Whether the head is tied is a
    property of the weights (see `load_hf_t5`), so the caller passes it."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    data = read_json_object(config_file)
    declared = data.get("architectures") or []
    if T5 not in declared and (declared or data.get("model_type") != T5_MODEL_TYPE):
        named = ", ".join(declared) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares {named}, not {T5}; load_hf_t5 imports T5 encoder-decoder "
                          "checkpoints only (decoders load with llmkit.checkpoints.load_model)")
    projection = data.get("feed_forward_proj", "relu")
    if projection not in T5_FEED_FORWARD:
        raise LlmkitError(f"{config_file}: feed_forward_proj={projection!r} is not supported; llmkit's T5 supports "
                          f"{', '.join(T5_FEED_FORWARD)}")
    mlp, approximate = T5_FEED_FORWARD[projection]
    # transformers 5 writes scale_decoder_outputs; older files say tie_word_embeddings=false for v1.1
    scale = data.get("scale_decoder_outputs", data.get("tie_word_embeddings", True) is not False)
    n_layers = _require(data, "num_layers", config_file)
    return Config(
        name=config_file.parent.name or "hf-t5", arch="seq2seq", vocab_size=_require(data, "vocab_size", config_file),
        n_layers=n_layers, n_decoder_layers=data.get("num_decoder_layers") or n_layers,
        n_heads=_require(data, "num_heads", config_file), head_dim=_require(data, "d_kv", config_file),
        d_model=_require(data, "d_model", config_file), d_ff=_require(data, "d_ff", config_file),
        max_seq_len=data.get("n_positions") or 512, norm="rmsnorm", norm_eps=data.get("layer_norm_epsilon", 1e-6),
        mlp=mlp, gelu_approximate=approximate, tie_embeddings=tie_embeddings, position="relative",
        relative_attention_num_buckets=data.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=data.get("relative_attention_max_distance", 128),
        decoder_start_id=data.get("decoder_start_token_id", data.get("pad_token_id", 0)),
        pad_id=data.get("pad_token_id", 0), eos_id=data.get("eos_token_id", 1), attention_scale=1.0,
        scale_decoder_outputs=bool(scale), extra={ARCHITECTURE_KEY: T5},
    )


def _require(data: dict[str, Any], key: str, config_file: Path) -> Any:
    if data.get(key) is None:
        raise LlmkitError(f"{config_file}: the config has no {key!r}; the file is incomplete, use the config.json "
                          "that came with the weights")
    return data[key]


def t5_module_map(config: Config) -> dict[str, str]:
    """HF module name -> llmkit module name for every layer of `config`."""
    modules = {}
    for hf_name, name in T5_MODULES.items():
        n_layers = config.n_layers if hf_name.startswith("encoder") else config.n_decoder_layers
        for i in range(n_layers) if "{i}" in hf_name else [None]:
            modules[hf_name.format(i=i)] = name.format(i=i)
    return modules


def load_hf_t5(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict of a Hugging Face T5ForConditionalGeneration directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a directory; pass the Hugging Face T5 folder that holds "
                          f"{CONFIG_FILE} and model.safetensors")
    t5_config_from_hf(directory)  # refuse a non-T5 directory before touching the weights
    locations, _ = _tensor_locations(directory)  # HF tensor name -> file (safetensors only; pickles refused)
    tensors = _read_tensors(locations, [name for name in locations if name not in SKIPPED])
    untied = HEAD in tensors and SHARED in tensors and not torch.equal(tensors[HEAD], tensors[SHARED])
    if not untied:
        tensors.pop(HEAD, None)  # a stored copy of the shared embedding
    config = t5_config_from_hf(directory, tie_embeddings=not untied)
    modules = t5_module_map(config)
    with torch.device("meta"):
        expected = Seq2Seq(config).state_dict()
    state = {}
    for hf_name, tensor in tensors.items():
        module, parameter = hf_name.rsplit(".", 1)
        name = f"{modules[module]}.{parameter}" if module in modules else None
        if name not in expected:
            raise LlmkitError(f"unexpected tensor {hf_name} in {locations[hf_name]}: a T5 model with this config.json "
                              f"({config.n_layers}+{config.n_decoder_layers} layers) has no such weight; use the "
                              "config.json that came with these weights")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmkitError(f"tensor {hf_name} has shape {tuple(tensor.shape)} in {locations[hf_name]}, config "
                              f"expects {tuple(expected[name].shape)}; config.json does not describe these weights")
        state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        to_hf = {name: hf for hf, name in modules.items()}
        first = to_hf[missing[0].rsplit(".", 1)[0]] + "." + missing[0].rsplit(".", 1)[1]
        raise LlmkitError(f"tensor {first} (and {len(missing) - 1} more) missing from {directory}; the checkpoint is "
                          "incomplete (an interrupted download or export): re-download or re-export it")
    return config, state


def _read_tensors(locations: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in dict.fromkeys(locations[name] for name in names):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in (n for n in names if locations[n] == file):
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise LlmkitError(f"{file} cannot be read ({error}); it is truncated or corrupt: re-download or "
                              "re-export it") from None
    return tensors


def build_seq2seq(
    config: Config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Seq2Seq:
    """A Seq2Seq holding `state_dict`, checked name by name and shape by shape against `config`."""
    with torch.device("meta"):
        model = Seq2Seq(config)
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(state_dict)) or [
        name for name in expected if tuple(state_dict[name].shape) != tuple(expected[name].shape)]
    if wrong:
        raise LlmkitError(f"checkpoint does not fit config {config.name!r}: tensor {wrong[0]} is missing, unexpected "
                          "or of another shape; the weights and config.json come from different models")
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state_dict.items()}, assign=True)
    return model.to(device).eval()


def load_seq2seq(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Seq2Seq:
    """A ready-to-run encoder-decoder from a Hugging Face T5 directory or an llmkit seq2seq checkpoint directory."""
    from llmkit.checkpoints import detect_format
    from llmkit.checkpoints.native import load_native
    from llmkit.device import resolve_device, resolve_dtype

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    kind = detect_format(path)
    if kind == "gguf":
        raise LlmkitError(f"{path} is a GGUF file; encoder-decoder models load from a Hugging Face T5 directory or "
                          "an llmkit checkpoint directory")
    config, state_dict = load_hf_t5(path) if kind == "hf" else load_native(path)
    if config.arch != "seq2seq":
        raise LlmkitError(f"{path} holds a {config.arch} model ({config.name}), not an encoder-decoder; load it "
                          "with llmkit.checkpoints.load_model")
    return build_seq2seq(config, state_dict, dtype, device)
