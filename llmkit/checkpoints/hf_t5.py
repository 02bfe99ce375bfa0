"""Hugging Face T5 checkpoints (T5ForConditionalGeneration) in and out: config.json <-> Config, and one explicit key
map (export, `t5_config_dict` + `to_hf_t5_state_dict` written by `llmkit.checkpoints.hf.export_hf`, inverts it).

Both layouts load: T5 v1.0 (feed_forward_proj "relu", LM head tied to the shared embedding and fed the decoder
output times d_model**-0.5) and T5 v1.1 / FLAN-T5 ("gated-gelu", an untied head, no rescaling). The head is
untied when the file stores an `lm_head.weight` that differs from `shared.weight`, as transformers decides.
Weights are read with `safetensors` only; `llmkit.checkpoints.load_model` builds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoints.hf_config import CONFIG_FILE, REQUIRED, build_config, check_round_trip, read_field
from llmkit.checkpoints.hf_files import layer_module_map, module_state, read_tensors, tensor_locations
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.seq2seq import Seq2Seq

T5 = "T5ForConditionalGeneration"
T5_MODEL_TYPE = "t5"
# feed_forward_proj -> (llmkit mlp, gelu_approximate); transformers maps "gated-gelu" to gelu_new (tanh)
T5_FEED_FORWARD = {"relu": ("relu", "none"), "gated-gelu": ("geglu", "tanh"), "gated-silu": ("swiglu", "none")}
FEED_FORWARD_PROJ = {variant: projection for projection, variant in T5_FEED_FORWARD.items()}  # the inverse, for export
SHARED = "shared.weight"
HEAD = "lm_head.weight"
# llmkit field -> T5 config.json key, for Config's error messages
T5_NAMES = dict(vocab_size="vocab_size", n_layers="num_layers", n_decoder_layers="num_decoder_layers",
                n_heads="num_heads", head_dim="d_kv", d_ff="d_ff", max_seq_len="n_positions",
                norm_eps="layer_norm_epsilon")
# Copies of the shared embedding some exporters write, and a table transformers itself ignores on load.
SKIPPED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# HF module name -> llmkit module name; "{i}" is the layer index. Parameter suffixes carry over.
ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
FEED_FORWARD = {"wi": "up_proj", "wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
GATED_ONLY, UNGATED_ONLY = (".DenseReluDense.wi_0", ".DenseReluDense.wi_1"), (".DenseReluDense.wi",)
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
    return t5_config_from_dict(read_json_object(config_file), config_file, tie_embeddings)


def t5_config_from_dict(data: dict[str, Any], config_file: Path, tie_embeddings: bool = True) -> Config:
    """`t5_config_from_hf` of config.json's contents (`config_file` names the file in errors); `t5_config_dict` is
    its inverse. A token id the file sets to null is None; one it leaves out takes T5's default."""
    declared = data.get("architectures") or []
    if T5 not in declared and (declared or data.get("model_type") != T5_MODEL_TYPE):
        named = ", ".join(declared) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares {named}, not {T5}; load_hf_t5 imports T5 encoder-decoder "
                          "checkpoints only (decoders load with llmkit.checkpoints.load_model)")
    field = lambda key, kind, default=REQUIRED: read_field(data, key, config_file, kind, default)
    token = lambda key, default: None if key in data and data[key] is None else field(key, int, default)
    projection = field("feed_forward_proj", str, "relu")
    if projection not in T5_FEED_FORWARD:
        raise LlmkitError(f"{config_file}: feed_forward_proj={projection!r} is not supported; llmkit's T5 supports "
                          f"{', '.join(T5_FEED_FORWARD)}")
    mlp, approximate = T5_FEED_FORWARD[projection]
    # transformers 5 writes scale_decoder_outputs; older files say tie_word_embeddings=false for v1.1
    scale = field("scale_decoder_outputs", bool, field("tie_word_embeddings", bool, True))
    n_layers = field("num_layers", int)
    pad_id = token("pad_token_id", 0)
    return build_config(
        config_file, T5_NAMES, name=config_file.parent.name or "hf-t5", arch="seq2seq",
        vocab_size=field("vocab_size", int), n_layers=n_layers,
        n_decoder_layers=field("num_decoder_layers", int, 0) or n_layers, n_heads=field("num_heads", int),
        head_dim=field("d_kv", int), d_model=field("d_model", int), d_ff=field("d_ff", int),
        max_seq_len=field("n_positions", int, 0) or 512, norm="rmsnorm",
        norm_eps=field("layer_norm_epsilon", float, 1e-6), mlp=mlp, gelu_approximate=approximate,
        tie_embeddings=tie_embeddings, position="relative",
        relative_attention_num_buckets=field("relative_attention_num_buckets", int, 32),
        relative_attention_max_distance=field("relative_attention_max_distance", int, 128),
        decoder_start_id=field("decoder_start_token_id", int, pad_id), pad_id=pad_id,
        bos_id=field("bos_token_id", int, None), eos_id=token("eos_token_id", 1), attention_scale=1.0,
        scale_decoder_outputs=scale, hf_architecture=T5,
    )


def t5_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for a seq2seq `config` as T5ForConditionalGeneration: every field
    `t5_config_from_dict` reads (checked: reading it back gives `config`), dropout off as in llmkit."""
    approximate = config.gelu_approximate if config.mlp == "geglu" else "none"
    projection = FEED_FORWARD_PROJ.get((config.mlp, approximate))
    if projection is None:
        supported = ", ".join(f"mlp={mlp!r}" + (f" with gelu_approximate={gelu!r}" if mlp == "geglu" else "")
                              + f" ({name})" for name, (mlp, gelu) in T5_FEED_FORWARD.items())
        raise LlmkitError(f"config {config.name!r} has mlp={config.mlp!r} with gelu_approximate="
                          f"{config.gelu_approximate!r}, which T5's feed_forward_proj cannot express (it has "
                          f"{supported}); change mlp or save the model in llmkit's native format (--to native)")
    data = dict(
        architectures=[T5], model_type=T5_MODEL_TYPE, vocab_size=config.vocab_size, d_model=config.d_model,
        d_kv=config.head_dim, d_ff=config.d_ff, num_layers=config.n_layers, num_decoder_layers=config.n_decoder_layers,
        num_heads=config.n_heads, n_positions=config.max_seq_len,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, feed_forward_proj=projection,
        layer_norm_epsilon=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        scale_decoder_outputs=config.scale_decoder_outputs, is_encoder_decoder=True, dropout_rate=0.0,
        classifier_dropout=0.0, pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
        decoder_start_token_id=config.decoder_start_id, torch_dtype=str(dtype).removeprefix("torch."), use_cache=True,
    )
    check_round_trip(config, t5_config_from_dict(data, Path(CONFIG_FILE), config.tie_embeddings), T5)
    return data


def t5_config(path: str | Path) -> Config:
    """The Config of a T5 directory with its head tied or not as the weights say (see `load_hf_t5`); reads only
    the two embedding tensors."""
    directory = Path(path)
    t5_config_from_hf(directory)  # refuse a non-T5 directory before touching the weights
    locations, _ = tensor_locations(directory)
    return t5_config_from_hf(directory, tie_embeddings=not _untied(read_tensors(
        locations, [name for name in (HEAD, SHARED) if name in locations])))


def _untied(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the stored LM head is its own matrix rather than a copy of the shared embedding (as transformers
    decides)."""
    return HEAD in tensors and SHARED in tensors and not torch.equal(tensors[HEAD], tensors[SHARED])


def t5_module_map(config: Config) -> dict[str, str]:
    """HF module name -> llmkit module name for every layer of `config`."""
    return layer_module_map(T5_MODULES, "encoder", config.n_layers, config.n_decoder_layers)


def to_hf_t5_state_dict(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the import key map: llmkit-named seq2seq tensors -> T5ForConditionalGeneration's names (the
    feed-forward input as wi for ReLU, wi_0/wi_1 for a gated MLP; lm_head only when the model has its own)."""
    skipped = UNGATED_ONLY if config.mlp in ("geglu", "swiglu") else GATED_ONLY
    to_hf = {module: hf_module for hf_module, module in t5_module_map(config).items()
             if not hf_module.endswith(skipped)}
    hf_state = {}
    for name, tensor in state.items():
        module, parameter = name.rsplit(".", 1)
        hf_state[f"{to_hf[module]}.{parameter}"] = tensor
    return hf_state


def load_hf_t5(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict of a Hugging Face T5ForConditionalGeneration directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a directory; pass the Hugging Face T5 folder that holds "
                          f"{CONFIG_FILE} and model.safetensors")
    t5_config_from_hf(directory)  # refuse a non-T5 directory before touching the weights
    locations, _ = tensor_locations(directory)  # HF tensor name -> file (safetensors only; pickles refused)
    tensors = read_tensors(locations, [name for name in locations if name not in SKIPPED])
    untied = _untied(tensors)
    if not untied:
        tensors.pop(HEAD, None)  # a stored copy of the shared embedding
    config = t5_config_from_hf(directory, tie_embeddings=not untied)
    modules = t5_module_map(config)
    with torch.device("meta"):
        expected = Seq2Seq(config).state_dict()
    state = module_state(tensors, modules, expected, locations,
                         f"a T5 model with this config.json ({config.n_layers}+{config.n_decoder_layers} layers)")
    missing = sorted(set(expected) - set(state))
    if missing:
        to_hf = {name: hf for hf, name in modules.items()}
        first = to_hf[missing[0].rsplit(".", 1)[0]] + "." + missing[0].rsplit(".", 1)[1]
        raise LlmkitError(f"tensor {first} (and {len(missing) - 1} more) missing from {directory}; the checkpoint is "
                          "incomplete (an interrupted download or export): re-download or re-export it")
    return config, state
