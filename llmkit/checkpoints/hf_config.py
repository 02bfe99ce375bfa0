"""config.json <-> Config for the Hugging Face families llmkit imports and exports: GPT-2, Llama,
Mistral, Qwen2, BLOOM, Phi-3, Gemma and StableLM. The family is the one config.json declares, never guessed from
tensor names."""

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
BLOOM = "BloomForCausalLM"
PHI3 = "Phi3ForCausalLM"
GEMMA = "GemmaForCausalLM"
MIXTRAL = "MixtralForCausalLM"
STABLELM = "StableLmForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2", BLOOM: "bloom", PHI3: "phi3",
               GEMMA: "gemma", MIXTRAL: "mixtral", STABLELM: "stablelm"}
ARCHITECTURE_KEY = "hf_architecture"  # Config.extra key: the family a checkpoint came from, written back on export
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # transformers runs Gemma's legacy "gelu" as the tanh approximation
BLOOM_CONTEXT = 2048  # BLOOM's training length; ALiBi has no position table, so config.json may not say it
# Fields only some families have: every other family needs them at these (Config's) defaults.
FAMILY_ONLY_FIELDS = dict(embed_norm=False, scale_embeddings=False, norm_offset=0.0, n_experts=0, rope_fraction=1.0)
# Families whose RoPE may rotate only part of each head, with transformers' default partial_rotary_factor
PARTIAL_ROTARY = {PHI3: 1.0, STABLELM: 0.25}
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
    elif architecture == BLOOM:
        fields = _bloom_fields(data, config_file)
    else:
        fields = _llama_fields(data, config_file, architecture)
    extra: dict[str, Any] = {ARCHITECTURE_KEY: architecture, **fields.pop("extra")}
    eos = data.get("eos_token_id")
    if isinstance(eos, list):  # Llama 3 instruct models stop on several tokens; the first is the main one
        extra["eos_token_ids"] = eos
        eos = eos[0] if eos else None
    return Config(name=config_file.parent.name or "hf-model", bos_id=data.get("bos_token_id"), eos_id=eos,
                  extra=extra, **fields)


# Families llmkit loads with their own model classes rather than the Decoder.
OTHER_LOADERS = {"bert": "llmkit.checkpoints.hf_bert.load_encoder (or `llmkit embed`)",
                 "t5": "llmkit.checkpoints.hf_t5.load_seq2seq"}


def _declared_architecture(data: dict[str, Any], config_file: Path) -> str:
    declared = data.get("architectures") or []
    for architecture in declared:
        if architecture in MODEL_TYPES:
            return architecture
    by_model_type = {model_type: architecture for architecture, model_type in MODEL_TYPES.items()}
    if not declared and data.get("model_type") in by_model_type:
        return by_model_type[data["model_type"]]
    named = ", ".join(declared) or f"model_type {data.get('model_type')!r}"
    other_loader = OTHER_LOADERS.get(data.get("model_type"))
    if other_loader:
        raise LlmkitError(f"{config_file} is a {data['model_type']} model, not a decoder-only language model; load it "
                          f"with {other_loader}")
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


def _bloom_fields(data: dict[str, Any], config_file: Path) -> dict[str, Any]:
    for flag, supported in (("apply_residual_connection_post_layernorm", False), ("slow_but_exact", False)):
        if data.get(flag, supported) != supported:
            raise LlmkitError(f"{config_file}: {flag}={data[flag]} is not supported by llmkit's BLOOM "
                              f"(only {flag}={supported}); this checkpoint cannot be imported")
    d_model = data.get("hidden_size") or _require(data, "n_embed", config_file)  # older BLOOM configs say n_embed
    return dict(
        vocab_size=_require(data, "vocab_size", config_file), n_layers=_require(data, "n_layer", config_file),
        n_heads=_require(data, "n_head", config_file), d_model=d_model, d_ff=4 * d_model,
        max_seq_len=data.get("seq_length") or BLOOM_CONTEXT, norm="layernorm",
        norm_eps=data.get("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approximate="tanh", qkv_bias=True,
        out_bias=True, mlp_bias=True, tie_embeddings=data.get("tie_word_embeddings", True), position="alibi",
        embed_norm=True, extra={},
    )


def _llama_fields(data: dict[str, Any], config_file: Path, architecture: str) -> dict[str, Any]:
    """Llama and the families that differ from it in a few fields (Mistral, Qwen2, Phi-3, Gemma, StableLM)."""
    activation = data.get("hidden_act", "gelu_pytorch_tanh" if architecture == GEMMA else "silu")
    if architecture == GEMMA and activation not in GEMMA_ACTIVATIONS:
        raise LlmkitError(f"{config_file}: hidden_act={activation!r}; llmkit's Gemma GeGLU MLP supports "
                          f"{', '.join(GEMMA_ACTIVATIONS)} (both the tanh approximation)")
    if architecture != GEMMA and activation != "silu":
        raise LlmkitError(f"{config_file}: hidden_act={activation!r}; llmkit's SwiGLU MLP supports only 'silu'")
    rope_fraction = (data.get("rope_parameters") or {}).get("partial_rotary_factor", data.get("partial_rotary_factor"))
    rope_fraction = PARTIAL_ROTARY.get(architecture, 1.0) if rope_fraction is None else float(rope_fraction)
    if rope_fraction != 1.0 and architecture not in PARTIAL_ROTARY:
        raise LlmkitError(f"{config_file}: partial_rotary_factor={rope_fraction}, which transformers' {architecture} "
                          "ignores (it rotates every channel); remove the key or set it to 1.0")
    for flag in ("qk_layernorm", "use_parallel_residual"):  # StableLM variants (stablelm-2-12b) llmkit lacks
        if data.get(flag):
            raise LlmkitError(f"{config_file}: {flag}=true is not supported by llmkit's StableLM (only false); this "
                              "checkpoint cannot be imported")
    if data.get("use_bidirectional_attention"):
        raise LlmkitError(f"{config_file}: use_bidirectional_attention=true is not a causal language model; llmkit's "
                          "Gemma is causal only")
    n_heads = _require(data, "num_attention_heads", config_file)
    n_layers = _require(data, "num_hidden_layers", config_file)
    max_seq_len = _require(data, "max_position_embeddings", config_file)
    fields = dict(
        vocab_size=_require(data, "vocab_size", config_file), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads, d_model=_require(data, "hidden_size", config_file),
        head_dim=data.get("head_dim") or None, d_ff=_require(data, "intermediate_size", config_file),
        max_seq_len=max_seq_len, norm="rmsnorm", norm_eps=data.get("rms_norm_eps", 1e-6), mlp="swiglu",
        tie_embeddings=data.get("tie_word_embeddings", architecture == GEMMA), position="rope", extra={},
        rope_fraction=rope_fraction, **_rope_fields(data, config_file, max_seq_len),
    )
    if rope_fraction != 1.0 and fields["rope_scaling"] is not None:
        raise LlmkitError(f"{config_file}: partial_rotary_factor={rope_fraction} with RoPE scaling is not supported; "
                          "llmkit scales RoPE only when it rotates whole heads")
    if architecture == LLAMA:  # one attention_bias flag covers q, k, v and o
        fields.update(qkv_bias=bool(data.get("attention_bias", False)), out_bias=bool(data.get("attention_bias", False)),
                      mlp_bias=bool(data.get("mlp_bias", False)))
    if architecture == QWEN2:  # Qwen2 always has q/k/v biases and no output bias
        fields.update(qkv_bias=True)
    if architecture == GEMMA:  # embeddings times sqrt(d), norms scale by (1 + weight), gated GELU (tanh)
        fields.update(qkv_bias=bool(data.get("attention_bias", False)), out_bias=bool(data.get("attention_bias", False)),
                      scale_embeddings=True, norm_offset=1.0, mlp="geglu", gelu_approximate="tanh")
    if architecture == STABLELM:  # LayerNorm with bias, optional q/k/v bias, partial rotary (above)
        fields.update(norm="layernorm", norm_eps=data.get("layer_norm_eps", 1e-5),
                      qkv_bias=bool(data.get("use_qkv_bias", False)))
    if architecture == MIXTRAL:  # every FFN is a mixture of SwiGLU experts behind a top-k (renormalised) router
        fields.update(n_experts=data.get("num_local_experts", 8), experts_per_token=data.get("num_experts_per_tok", 2),
                      router="topk", router_aux_loss_coef=float(data.get("router_aux_loss_coef", 0.001)),
                      router_z_loss_coef=0.0)
    window = data.get("sliding_window")
    if architecture == QWEN2:
        sliding = "sliding_attention" in (data.get("layer_types") or []) or (
            bool(data.get("use_sliding_window")) and data.get("max_window_layers", n_layers) < n_layers)
        window = window if sliding else None
    if architecture in (MISTRAL, QWEN2, PHI3, MIXTRAL) and window is not None:
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
    Mixtral for a mixture of experts, GPT-2 for learned positions, BLOOM for ALiBi, Gemma for its embedding scale,
    norm offset or GeGLU, StableLM for RoPE with LayerNorm, Phi-3 for partial rotary with RMSNorm, Qwen2 for q/k/v
    bias without output bias, Llama otherwise."""
    declared = config.extra.get(ARCHITECTURE_KEY)
    if declared in MODEL_TYPES and _misfit(declared, config) is None:
        return declared
    if config.n_experts:
        candidate = MIXTRAL
    elif config.position == "learned":
        candidate = GPT2
    elif config.position == "alibi":
        candidate = BLOOM
    elif config.scale_embeddings or config.norm_offset or config.mlp == "geglu":
        candidate = GEMMA
    elif config.norm == "layernorm":
        candidate = STABLELM
    elif config.rope_fraction != 1.0:
        candidate = PHI3
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
    elif architecture == BLOOM:
        wanted = dict(position="alibi", norm="layernorm", mlp="gelu", gelu_approximate="tanh", qkv_bias=True,
                      out_bias=True, mlp_bias=True, embed_norm=True)
        if (config.n_kv_heads != config.n_heads or config.head_dim * config.n_heads != config.d_model
                or config.d_ff != 4 * config.d_model):
            return "n_kv_heads == n_heads, head_dim * n_heads == d_model and d_ff == 4 * d_model"
    else:
        wanted = dict(position="rope", norm="rmsnorm", mlp="swiglu")
        if architecture in (LLAMA, GEMMA) and config.qkv_bias != config.out_bias:
            return "qkv_bias == out_bias (one attention_bias flag)"
        if architecture in (QWEN2, MISTRAL, PHI3, MIXTRAL):
            wanted.update(qkv_bias=architecture == QWEN2, out_bias=False, mlp_bias=False)
        if architecture == MIXTRAL:
            if config.n_experts < 1:
                return "n_experts > 0 (a mixture of experts)"
            wanted.update(router="topk", n_experts=config.n_experts)
        if architecture in (PHI3, STABLELM):  # any rope_fraction: both rotate the leading channels of a head
            wanted.update(rope_scaling=None, rope_fraction=config.rope_fraction)
            if config.head_dim * config.n_heads != config.d_model:
                return "head_dim * n_heads == d_model"
        if architecture == STABLELM:
            wanted.update(norm="layernorm", out_bias=False, mlp_bias=False)
        if architecture == GEMMA:
            wanted.update(mlp="geglu", gelu_approximate="tanh", mlp_bias=False, scale_embeddings=True, norm_offset=1.0)
    for field, value in {**FAMILY_ONLY_FIELDS, **wanted}.items():
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
    if architecture == BLOOM:
        return dict(common, hidden_size=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                    layer_norm_epsilon=config.norm_eps, seq_length=config.max_seq_len, hidden_dropout=0.0,
                    attention_dropout=0.0, apply_residual_connection_post_layernorm=False, pretraining_tp=1,
                    slow_but_exact=False)
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
    if architecture == MIXTRAL:
        fields.update(sliding_window=None, num_local_experts=config.n_experts, num_experts_per_tok=config.experts_per_token,
                      router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False)
    if architecture in PARTIAL_ROTARY:
        fields["rope_parameters"]["partial_rotary_factor"] = config.rope_fraction
        fields.update(partial_rotary_factor=config.rope_fraction)
    if architecture == PHI3:  # pad_token_id: Phi3Config's default (32000) would not fit a smaller vocabulary
        fields.update(sliding_window=None, pad_token_id=None, original_max_position_embeddings=config.max_seq_len)
    if architecture == STABLELM:
        fields.update(layer_norm_eps=config.norm_eps, use_qkv_bias=config.qkv_bias, qk_layernorm=False,
                      use_parallel_residual=False, hidden_dropout=0.0)
    if architecture == GEMMA:
        fields.update(hidden_act="gelu_pytorch_tanh", attention_bias=config.qkv_bias)
    return fields
