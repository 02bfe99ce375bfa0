"""Hugging Face Whisper checkpoints (WhisperForConditionalGeneration) in and out: config.json <-> Config, and one
explicit key map (export, `whisper_config_dict` + `to_hf_whisper_state_dict` written by
`llmkit.checkpoints.hf.export_hf`, inverts it).

Whisper's key projections have no bias; llmkit's attention has one `qkv_bias` switch, so import fills a zero key
bias and export leaves it out. That is exact for any trained value too: a key bias adds the same q.b to every score of
a query, which the softmax cancels. Weights are read with `safetensors` only; `llmkit.checkpoints.load_model` builds
the model.
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
from llmkit.models.speech import SpeechModel

WHISPER = "WhisperForConditionalGeneration"
WHISPER_MODEL_TYPE = "whisper"
HEAD = "proj_out.weight"
EMBED = "model.decoder.embed_tokens.weight"
# llmkit field -> Whisper config.json key, for Config's error messages
WHISPER_NAMES = dict(vocab_size="vocab_size", n_layers="encoder_layers", n_decoder_layers="decoder_layers",
                     n_heads="encoder_attention_heads", d_ff="encoder_ffn_dim", max_seq_len="max_target_positions",
                     n_mels="num_mel_bins", n_audio_ctx="max_source_positions")

# HF module name -> llmkit module name; "{i}" is the layer index. Parameter suffixes carry over.
ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "o_proj"}
LAYER = {"self_attn_layer_norm": "attn_norm", "fc1": "mlp.up_proj", "fc2": "mlp.down_proj",
         "final_layer_norm": "mlp_norm", **{f"self_attn.{hf}": f"attn.{name}" for hf, name in ATTENTION.items()}}
DECODER_LAYER = {**LAYER, "encoder_attn_layer_norm": "cross_attn_norm",
                 **{f"encoder_attn.{hf}": f"cross_attn.{name}" for hf, name in ATTENTION.items()}}
WHISPER_MODULES = {
    "model.encoder.conv1": "encoder.conv1",
    "model.encoder.conv2": "encoder.conv2",
    **{f"model.encoder.layers.{{i}}.{hf}": f"encoder.blocks.{{i}}.{name}" for hf, name in LAYER.items()},
    "model.encoder.layer_norm": "encoder.final_norm",
    "model.decoder.embed_tokens": "embed",
    "model.decoder.embed_positions": "decoder.positions",
    **{f"model.decoder.layers.{{i}}.{hf}": f"decoder.blocks.{{i}}.{name}" for hf, name in DECODER_LAYER.items()},
    "model.decoder.layer_norm": "decoder.final_norm",
    "proj_out": "lm_head",
}
ENCODER_POSITIONS = ("model.encoder.embed_positions.weight", "encoder.positions")  # a buffer in llmkit
KEY_BIAS = ".k_proj.bias"  # llmkit holds it (zero); Whisper has none


def whisper_config_from_hf(path: str | Path) -> Config:
    """A speech `Config` from a Whisper config.json (the file or its directory)."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    return whisper_config_from_dict(read_json_object(config_file), config_file)


def whisper_config_from_dict(data: dict[str, Any], config_file: Path) -> Config:
    """`whisper_config_from_hf` of config.json's contents (`config_file` names the file in errors);
    `whisper_config_dict` is its inverse. Variants llmkit's model does not compute are refused by name."""
    declared = data.get("architectures") or []
    if WHISPER not in declared and (declared or data.get("model_type") != WHISPER_MODEL_TYPE):
        named = ", ".join(declared) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares {named}, not {WHISPER}; load_hf_whisper imports Whisper "
                          "speech-recognition checkpoints only")
    field = lambda key, kind, default=REQUIRED: read_field(data, key, config_file, kind, default)
    for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if field(ours, int) != field(theirs, int):
            raise LlmkitError(f"{config_file}: {ours}={data[ours]} differs from {theirs}={data[theirs]}; llmkit's "
                              "speech model uses one size for both stacks (every released Whisper does)")
    activation = field("activation_function", str, "gelu")
    if activation != "gelu" or field("scale_embedding", bool, False):
        raise LlmkitError(f"{config_file}: activation_function={activation!r}, scale_embedding="
                          f"{data.get('scale_embedding')!r}; llmkit's speech model computes Whisper's 'gelu' without "
                          "embedding scaling only")
    eos = data.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    d_model = field("d_model", int)
    return build_config(
        config_file, WHISPER_NAMES, name=config_file.parent.name or "hf-whisper", arch="speech",
        vocab_size=field("vocab_size", int), n_layers=field("encoder_layers", int),
        n_decoder_layers=field("decoder_layers", int), n_heads=field("encoder_attention_heads", int), d_model=d_model,
        d_ff=field("encoder_ffn_dim", int), max_seq_len=field("max_target_positions", int, 448), norm="layernorm",
        norm_eps=1e-5, mlp="gelu", gelu_approximate="none", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=field("tie_word_embeddings", bool, True), position="learned",
        n_mels=field("num_mel_bins", int, 80), n_audio_ctx=field("max_source_positions", int, 1500),
        decoder_start_id=field("decoder_start_token_id", int, 50257), pad_id=field("pad_token_id", int, None),
        bos_id=field("bos_token_id", int, None), eos_id=read_field({"eos_token_id": eos}, "eos_token_id", config_file,
                                                                   int, None),
        hf_architecture=WHISPER,
    )


def whisper_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for a speech `config` as WhisperForConditionalGeneration: every field
    `whisper_config_from_dict` reads (checked: reading it back gives `config`), dropout off as in llmkit."""
    data = dict(
        architectures=[WHISPER], model_type=WHISPER_MODEL_TYPE, vocab_size=config.vocab_size,
        num_mel_bins=config.n_mels, encoder_layers=config.n_layers, decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads, decoder_attention_heads=config.n_heads, encoder_ffn_dim=config.d_ff,
        decoder_ffn_dim=config.d_ff, d_model=config.d_model, max_source_positions=config.n_audio_ctx,
        max_target_positions=config.max_seq_len, activation_function="gelu", scale_embedding=False,
        tie_word_embeddings=config.tie_embeddings, decoder_start_token_id=config.decoder_start_id,
        pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, is_encoder_decoder=True, use_cache=True,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    check_round_trip(config, whisper_config_from_dict(data, Path(CONFIG_FILE)), WHISPER)
    return data


def whisper_module_map(config: Config) -> dict[str, str]:
    """HF module name -> llmkit module name for every layer of `config`."""
    return layer_module_map(WHISPER_MODULES, "model.encoder", config.n_layers, config.n_decoder_layers)


def to_hf_whisper_state_dict(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the import key map: llmkit-named speech tensors -> WhisperForConditionalGeneration's names
    (no key biases; proj_out only when the head is untied; the encoder's sinusoids as embed_positions)."""
    to_hf = {module: hf_module for hf_module, module in whisper_module_map(config).items()}
    hf_state = {}
    for name, tensor in state.items():
        if name.endswith(KEY_BIAS):
            continue
        if name == ENCODER_POSITIONS[1]:
            hf_state[ENCODER_POSITIONS[0]] = tensor
            continue
        module, parameter = name.rsplit(".", 1)
        hf_state[f"{to_hf[module]}.{parameter}"] = tensor
    return hf_state


def load_hf_whisper(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict of a Hugging Face WhisperForConditionalGeneration directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a directory; pass the Hugging Face Whisper folder that holds "
                          f"{CONFIG_FILE} and model.safetensors")
    config = whisper_config_from_hf(directory)  # refuse a non-Whisper directory before touching the weights
    locations, _ = tensor_locations(directory)  # HF tensor name -> file (safetensors only; pickles refused)
    tensors = read_tensors(locations, list(locations))
    if config.tie_embeddings:
        tensors.pop(HEAD, None)  # a stored copy of the token embedding
    modules = whisper_module_map(config)
    with torch.device("meta"):
        expected = SpeechModel(config).state_dict()
    state = module_state(tensors, modules, expected, locations, f"a Whisper model with this config.json "
                         f"({config.n_layers}+{config.n_decoder_layers} layers)",
                         renamed={ENCODER_POSITIONS[0]: ENCODER_POSITIONS[1]})
    for name in expected:  # Whisper's key projections have no bias: llmkit's is zero (see the module docstring)
        if name.endswith(KEY_BIAS) and name not in state:
            state[name] = torch.zeros(expected[name].shape, dtype=state[name.replace(".bias", ".weight")].dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LlmkitError(f"tensor {missing[0]} (and {len(missing) - 1} more, llmkit names) missing from {directory}; "
                          "the checkpoint is incomplete (an interrupted download or export): re-download or "
                          "re-export it")
    return config, state
