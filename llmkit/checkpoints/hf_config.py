"""config.json <-> Config for the Hugging Face families llmkit imports and exports: GPT-2, Llama,
Mistral and Qwen2. The family is the one config.json declares, never guessed from tensor names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.config import Config, RopeScaling
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object

CONFIG_FILE = "config.json"
GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
MISTRAL = "MistralForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2"}
ARCHITECTURE_KEY = "hf_architecture"  # Config.extra key: the family a checkpoint came from, written back on export
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------- config.json -> Config


def config_from_hf(path: str | Path) -> Config:
    """A `Config` from a Hugging Face config.json (the file, or the directory holding it)."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    data = read_json_object(config_file)
    architecture = _declared_architecture(data, config_file)
    if architecture == GPT2:
        fields = _gpt2_fields(data, config_file)
    else:
        fields = _llama_fields(data, config_file, architecture)
    extra: dict[str, Any] = {ARCHITECTURE_KEY: architecture, **fields.pop("extra")}
    eos = data.get("eos_token_id")
    if isinstance(eos, list):  # Llama 3 instruct models stop on several tokens; the first is the main one
        extra["eos_token_ids"] = eos
        eos = eos[0] if eos else None
    return Config(name=config_file.parent.name or "hf-model", bos_id=data.get("bos_token_id"), eos_id=eos,
                  extra=extra, **fields)


def _declared_architecture(data: dict[str, Any], config_file: Path) -> str:
    declared = data.get("architectures") or []
    for architecture in declared:
        if architecture in MODEL_TYPES:
            return architecture
    by_model_type = {model_type: architecture for architecture, model_type in MODEL_TYPES.items()}
    if not declared and data.get("model_type") in by_model_type:
        return by_model_type[data["model_type"]]
    named = ", ".join(declared) or f"model_type {data.get('model_type')!r}"
    raise LlmkitError(
        f"{config_file} declares architecture {named}, which llmkit cannot import; supported architectures: "
        f"{', '.join(MODEL_TYPES)}"
    )


def _gpt2_fields(data: dict[str, Any], config_file: Path) -> dict[str, Any]:
    activation = data.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise LlmkitError(f"{config_file}: activation_function={activation!r} is not supported; llmkit's GPT-2 "
                          f"supports {', '.join(GPT2_ACTIVATIONS)}")
    for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
        if data.get(flag, supported) != supported:
            raise LlmkitError(f"{config_file}: {flag}={data[flag]} is not supported by llmkit's GPT-2 "
                              f"(only {flag}={supported}); this checkpoint cannot be imported")
    d_model = _require(data, "n_embd", config_file)
    return dict(
        vocab_size=_require(data, "vocab_size", config_file), n_layers=_require(data, "n_layer", config_file),
        n_heads=_require(data, "n_head", config_file), d_model=d_model, d_ff=data.get("n_inner") or 4 * d_model,
        max_seq_len=_require(data, "n_positions", config_file), norm="layernorm",
        norm_eps=data.get("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approximate=GPT2_ACTIVATIONS[activation],
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=data.get("tie_word_embeddings", True),
        position="learned", extra={},
    )


def _llama_fields(data: dict[str, Any], config_file: Path, architecture: str) -> dict[str, Any]:
    activation = data.get("hidden_act", "silu")
    if activation != "silu":
        raise LlmkitError(f"{config_file}: hidden_act={activation!r}; llmkit's SwiGLU MLP supports only 'silu'")
    n_heads = _require(data, "num_attention_heads", config_file)
    n_layers = _require(data, "num_hidden_layers", config_file)
    max_seq_len = _require(data, "max_position_embeddings", config_file)
    fields = dict(
        vocab_size=_require(data, "vocab_size", config_file), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads, d_model=_require(data, "hidden_size", config_file),
        head_dim=data.get("head_dim") or None, d_ff=_require(data, "intermediate_size", config_file),
        max_seq_len=max_seq_len, norm="rmsnorm", norm_eps=data.get("rms_norm_eps", 1e-6), mlp="swiglu",
        tie_embeddings=data.get("tie_word_embeddings", False), position="rope", extra={},
        **_rope_fields(data, config_file, max_seq_len),
    )
    if architecture == LLAMA:  # one attention_bias flag covers q, k, v and o
        fields.update(qkv_bias=bool(data.get("attention_bias", False)), out_bias=bool(data.get("attention_bias", False)),
                      mlp_bias=bool(data.get("mlp_bias", False)))
    if architecture == QWEN2:  # Qwen2 always has q/k/v biases and no output bias
        fields.update(qkv_bias=True)
    window = data.get("sliding_window")
    if architecture == QWEN2:
        sliding = "sliding_attention" in (data.get("layer_types") or []) or (
            bool(data.get("use_sliding_window")) and data.get("max_window_layers", n_layers) < n_layers)
        window = window if sliding else None
    if architecture in (MISTRAL, QWEN2) and window is not None:
        if window < max_seq_len:
            raise LlmkitError(
                f"{config_file}: sliding_window={window} is smaller than max_position_embeddings={max_seq_len}; "
                "llmkit does not implement sliding-window attention, so tokens further apart than the window "
                f"would attend differently. Set max_position_embeddings to {window} in config.json to use the "
                "model within its window, where full attention is exact"
            )
        fields["extra"]["sliding_window"] = window
    return fields


def _rope_fields(data: dict[str, Any], config_file: Path, max_seq_len: int) -> dict[str, Any]:
    """rope_theta and scaling from transformers 5 `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    parameters = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or parameters
    theta = float(parameters.get("rope_theta", data.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LlmkitError(f"{config_file}: RoPE scaling type {kind!r} is not supported; llmkit supports "
                          f"{', '.join(ROPE_TYPES)}")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    factor = float(_require(scaling, "factor", config_file, where="rope scaling"))
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling=RopeScaling(kind="linear", factor=factor))
    return dict(rope_theta=theta, rope_scaling=RopeScaling(
        kind="llama3", factor=factor, low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_seq_len=int(scaling.get("original_max_position_embeddings", max_seq_len)),
    ))


def _require(data: dict[str, Any], key: str, config_file: Path, where: str = "config") -> Any:
    if data.get(key) is None:
        raise LlmkitError(f"{config_file}: the {where} has no {key!r}; the file is incomplete, use the config.json "
                          "that came with the weights")
    return data[key]


# --------------------------------------------------------------------------- Config -> config.json


def hf_architecture(config: Config) -> str:
    """The HF architecture `config` is written as: the one it was imported from when it still fits, else
    GPT-2 for learned positions, Qwen2 for q/k/v bias without output bias, Llama otherwise."""
    declared = config.extra.get(ARCHITECTURE_KEY)
    if declared in MODEL_TYPES and _misfit(declared, config) is None:
        return declared
    if config.position == "learned":
        candidate = GPT2
    elif config.qkv_bias and not config.out_bias:
        candidate = QWEN2
    else:
        candidate = LLAMA
    reason = _misfit(candidate, config)
    if reason is not None:
        raise LlmkitError(f"config {config.name!r} fits no Hugging Face architecture llmkit exports "
                          f"({', '.join(MODEL_TYPES)}): the closest, {candidate}, needs {reason}; export it in "
                          "llmkit's native format instead")
    return candidate


def _misfit(architecture: str, config: Config) -> str | None:
    """Why `config` cannot be written as `architecture`, or None when it can."""
    if architecture == GPT2:
        wanted = dict(position="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                      rope_scaling=None)
        if config.n_kv_heads != config.n_heads or config.head_dim * config.n_heads != config.d_model:
            return "n_kv_heads == n_heads and head_dim * n_heads == d_model"
    else:
        wanted = dict(position="rope", norm="rmsnorm", mlp="swiglu")
        if architecture == LLAMA and config.qkv_bias != config.out_bias:
            return "qkv_bias == out_bias (one attention_bias flag)"
        if architecture in (QWEN2, MISTRAL):
            wanted.update(qkv_bias=architecture == QWEN2, out_bias=False, mlp_bias=False)
    for field, value in wanted.items():
        if getattr(config, field) != value:
            return f"{field}={value!r} (this config has {getattr(config, field)!r})"
    return None


def hf_config_dict(config: Config, architecture: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for `architecture` (legacy rope keys too, so 4.x loads it)."""
    eos: Any = config.eos_id
    if config.extra.get("eos_token_ids") and config.extra["eos_token_ids"][0] == eos:
        eos = config.extra["eos_token_ids"]
    common = dict(architectures=[architecture], model_type=MODEL_TYPES[architecture], vocab_size=config.vocab_size,
                  bos_token_id=config.bos_id, eos_token_id=eos, tie_word_embeddings=config.tie_embeddings,
                  torch_dtype=str(dtype).removeprefix("torch."), use_cache=True)
    if architecture == GPT2:
        activation = {"tanh": "gelu_new", "none": "gelu"}[config.gelu_approximate]
        # llmkit has no dropout layers; 0.0 keeps a transformers run of the exported model identical
        return dict(common, n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                    n_inner=config.d_ff, n_positions=config.max_seq_len, layer_norm_epsilon=config.norm_eps,
                    activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    scale_attn_weights=True)
    rope_scaling = None
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        rope_scaling = dict(rope_type="linear", type="linear", factor=scaling.factor)
    elif scaling is not None:
        rope_scaling = dict(rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                            high_freq_factor=scaling.high_freq_factor,
                            original_max_position_embeddings=scaling.original_max_seq_len)
    rope_parameters = dict(rope_scaling or {"rope_type": "default"}, rope_theta=config.rope_theta)
    rope_parameters.pop("type", None)
    fields = dict(common, hidden_size=config.d_model, intermediate_size=config.d_ff,
                  num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                  num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
                  max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                  rope_theta=config.rope_theta, rope_scaling=rope_scaling, rope_parameters=rope_parameters,
                  attention_dropout=0.0)
    if architecture == LLAMA:
        fields.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if architecture == QWEN2:
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    if architecture == MISTRAL:
        fields.update(sliding_window=None)
    return fields
