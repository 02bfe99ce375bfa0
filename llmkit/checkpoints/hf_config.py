"""config.json <-> Config for the Hugging Face families llmkit imports and exports: GPT-2, Llama,
Mistral, Qwen2, BLOOM, Phi-3, Gemma, Gemma 3 (text) and StableLM. The family is the one config.json declares, never
guessed from tensor names."""

from __future__ import annotations

import dataclasses
import re
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
GEMMA3 = "Gemma3ForCausalLM"  # the text-only model (model_type gemma3_text), e.g. gemma-3-270m and gemma-3-1b
GEMMAS = (GEMMA, GEMMA3)
MIXTRAL = "MixtralForCausalLM"
STABLELM = "StableLmForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2", BLOOM: "bloom", PHI3: "phi3",
               GEMMA: "gemma", GEMMA3: "gemma3_text", MIXTRAL: "mixtral", STABLELM: "stablelm"}
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # transformers runs Gemma's legacy "gelu" as the tanh approximation
BLOOM_CONTEXT = 2048  # BLOOM's training length; ALiBi has no position table, so config.json may not say it
# Fields only some families have: every other family needs them at these (Config's) defaults.
FAMILY_ONLY_FIELDS = dict(embed_norm=False, scale_embeddings=False, norm_offset=0.0, n_experts=0, rope_fraction=1.0,
                          qk_norm=False, post_norms=False, sliding_window=None, layer_types=(), rope_local_theta=None,
                          attention_scale=None)
# Gemma 3's layer_types names -> llmkit's
GEMMA3_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}
# Families whose RoPE may rotate only part of each head, with transformers' default partial_rotary_factor
PARTIAL_ROTARY = {PHI3: 1.0, STABLELM: 0.25}
ROPE_TYPES = ("default", "linear", "llama3")
# Config fields no config.json holds: the name is the directory's, notes are free-form, the class is the export's own
NOT_CARRIED = ("name", "extra", "hf_architecture")
MOE_ONLY = ("experts_per_token", "router", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef")
ROPE_ONLY = ("rope_theta", "rope_scaling", "rope_fraction")
REQUIRED = object()  # `read_field` default: the key must be present
JSON_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
              list: "a list"}
# llmkit field -> the config.json key that sets it, per layout: Config's errors are reworded with the file's names
LLAMA_NAMES = dict(vocab_size="vocab_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                   n_kv_heads="num_key_value_heads", d_model="hidden_size", head_dim="head_dim",
                   d_ff="intermediate_size", max_seq_len="max_position_embeddings", norm_eps="rms_norm_eps",
                   rope_theta="rope_theta", rope_fraction="partial_rotary_factor", n_experts="num_local_experts",
                   experts_per_token="num_experts_per_tok")
GPT2_NAMES = dict(vocab_size="vocab_size", n_layers="n_layer", n_heads="n_head", d_model="n_embd", d_ff="n_inner",
                  max_seq_len="n_positions", norm_eps="layer_norm_epsilon")
BLOOM_NAMES = dict(GPT2_NAMES, d_model="hidden_size", max_seq_len="seq_length")


# --------------------------------------------------------------------------- typed reads of config.json


def read_field(data: dict[str, Any], key: str, config_file: Path, kind: type, default: Any = REQUIRED,
               where: str = "config") -> Any:
    """`data[key]` checked against the JSON type it must have (bool is not an integer; an integer is a fine
    number), so a "64" or 2.5 in config.json is one error naming the file and the key, not a crash later.
    A missing or null key gives `default`, or an error when there is none."""
    value = data.get(key)
    if value is None:
        if default is REQUIRED:
            raise LlmkitError(f"{config_file}: the {where} has no {key!r}; the file is incomplete, use the "
                              "config.json that came with the weights")
        return default
    fits = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)) and (
        kind is bool or not isinstance(value, bool))
    if not fits:
        name = key if where == "config" else f"{where} {key}"
        raise LlmkitError(f"{config_file}: {name}={value!r} is {_json_kind(value)}, but it must be "
                          f"{JSON_TYPES[kind]}; fix {key} in the file")
    return float(value) if kind is float else value


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a fractional number", str: "a string", list: "a list",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def build_config(config_file: Path, names: dict[str, str], **fields: Any) -> Config:
    """`Config(**fields)`, its errors reworded with config.json's own keys (`names`: llmkit field -> key) and
    prefixed with the file, so the message points at what to fix in that file."""
    try:
        return Config(**fields)
    except LlmkitError as error:
        message = str(error)
        for field, key in names.items():
            message = re.sub(rf"\b{field}\b", key, message)
        raise LlmkitError(f"{config_file}: {message}") from None


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
    names = {GPT2: GPT2_NAMES, BLOOM: BLOOM_NAMES}.get(architecture, LLAMA_NAMES)
    eos = data.get("eos_token_id")
    eos_ids: tuple[int, ...] = ()
    if isinstance(eos, list):  # Llama 3 instruct models stop on several tokens; the first is the main one
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in eos):
            raise LlmkitError(f"{config_file}: eos_token_id={eos!r} must be an integer or a list of integers; fix "
                              "eos_token_id in the file")
        eos_ids, eos = tuple(eos), (eos[0] if eos else None)
    return build_config(config_file, names, name=config_file.parent.name or "hf-model",
                        bos_id=read_field(data, "bos_token_id", config_file, int, None),
                        eos_id=read_field({"eos_token_id": eos}, "eos_token_id", config_file, int, None),
                        hf_architecture=architecture, eos_ids=eos_ids, **fields)


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
    activation = read_field(data, "activation_function", config_file, str, "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise LlmkitError(f"{config_file}: activation_function={activation!r} is not supported; llmkit's GPT-2 "
                          f"supports {', '.join(GPT2_ACTIVATIONS)}")
    for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
        if data.get(flag, supported) != supported:
            raise LlmkitError(f"{config_file}: {flag}={data[flag]} is not supported by llmkit's GPT-2 "
                              f"(only {flag}={supported}); this checkpoint cannot be imported")
    d_model = read_field(data, "n_embd", config_file, int)
    return dict(
        vocab_size=read_field(data, "vocab_size", config_file, int),
        n_layers=read_field(data, "n_layer", config_file, int), n_heads=read_field(data, "n_head", config_file, int),
        d_model=d_model, d_ff=read_field(data, "n_inner", config_file, int, 0) or 4 * d_model,
        max_seq_len=read_field(data, "n_positions", config_file, int), norm="layernorm",
        norm_eps=read_field(data, "layer_norm_epsilon", config_file, float, 1e-5), mlp="gelu",
        gelu_approximate=GPT2_ACTIVATIONS[activation], qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=read_field(data, "tie_word_embeddings", config_file, bool, True), position="learned",
    )


def _bloom_fields(data: dict[str, Any], config_file: Path) -> dict[str, Any]:
    for flag, supported in (("apply_residual_connection_post_layernorm", False), ("slow_but_exact", False)):
        if data.get(flag, supported) != supported:
            raise LlmkitError(f"{config_file}: {flag}={data[flag]} is not supported by llmkit's BLOOM "
                              f"(only {flag}={supported}); this checkpoint cannot be imported")
    d_model = (read_field(data, "hidden_size", config_file, int, None)
               or read_field(data, "n_embed", config_file, int))  # older BLOOM configs say n_embed
    return dict(
        vocab_size=read_field(data, "vocab_size", config_file, int),
        n_layers=read_field(data, "n_layer", config_file, int), n_heads=read_field(data, "n_head", config_file, int),
        d_model=d_model, d_ff=4 * d_model, max_seq_len=read_field(data, "seq_length", config_file, int, BLOOM_CONTEXT),
        norm="layernorm", norm_eps=read_field(data, "layer_norm_epsilon", config_file, float, 1e-5), mlp="gelu",
        gelu_approximate="tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=read_field(data, "tie_word_embeddings", config_file, bool, True), position="alibi",
        embed_norm=True,
    )


def _llama_fields(data: dict[str, Any], config_file: Path, architecture: str) -> dict[str, Any]:
    """Llama and the families that differ from it in a few fields (Mistral, Qwen2, Phi-3, Gemma, StableLM)."""
    activation_key = "hidden_activation" if architecture == GEMMA3 else "hidden_act"
    default_activation = "gelu_pytorch_tanh" if architecture in GEMMAS else "silu"
    activation = read_field(data, activation_key, config_file, str, default_activation)
    if architecture in GEMMAS and activation not in GEMMA_ACTIVATIONS:
        raise LlmkitError(f"{config_file}: {activation_key}={activation!r}; llmkit's Gemma GeGLU MLP supports "
                          f"{', '.join(GEMMA_ACTIVATIONS)} (both the tanh approximation)")
    if architecture not in GEMMAS and activation != "silu":
        raise LlmkitError(f"{config_file}: hidden_act={activation!r}; llmkit's SwiGLU MLP supports only 'silu'")
    parameters = read_field(data, "rope_parameters", config_file, dict, {})
    rope_fraction = read_field(parameters, "partial_rotary_factor", config_file, float, None, where="rope_parameters")
    if rope_fraction is None:
        rope_fraction = read_field(data, "partial_rotary_factor", config_file, float, PARTIAL_ROTARY.get(architecture, 1.0))
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
    n_heads = read_field(data, "num_attention_heads", config_file, int)
    n_layers = read_field(data, "num_hidden_layers", config_file, int)
    max_seq_len = read_field(data, "max_position_embeddings", config_file, int)
    fields: dict[str, Any] = dict(
        vocab_size=read_field(data, "vocab_size", config_file, int), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=read_field(data, "num_key_value_heads", config_file, int, 0) or n_heads,
        d_model=read_field(data, "hidden_size", config_file, int),
        head_dim=read_field(data, "head_dim", config_file, int, 0) or None,
        d_ff=read_field(data, "intermediate_size", config_file, int), max_seq_len=max_seq_len, norm="rmsnorm",
        norm_eps=read_field(data, "rms_norm_eps", config_file, float, 1e-6), mlp="swiglu",
        tie_embeddings=read_field(data, "tie_word_embeddings", config_file, bool, architecture in GEMMAS),
        position="rope", rope_fraction=rope_fraction,
    )
    if architecture == GEMMA3:
        fields.update(_gemma3_fields(data, config_file, n_layers, max_seq_len))
    else:
        fields.update(_rope_fields(data, config_file, max_seq_len))
    if rope_fraction != 1.0 and fields["rope_scaling"] is not None:
        raise LlmkitError(f"{config_file}: partial_rotary_factor={rope_fraction} with RoPE scaling is not supported; "
                          "llmkit scales RoPE only when it rotates whole heads")
    attention_bias = read_field(data, "attention_bias", config_file, bool, False)
    if architecture == LLAMA:  # one attention_bias flag covers q, k, v and o
        fields.update(qkv_bias=attention_bias, out_bias=attention_bias,
                      mlp_bias=read_field(data, "mlp_bias", config_file, bool, False))
    if architecture == QWEN2:  # Qwen2 always has q/k/v biases and no output bias
        fields.update(qkv_bias=True)
    if architecture in GEMMAS:  # embeddings times sqrt(d), norms scale by (1 + weight), gated GELU (tanh)
        fields.update(qkv_bias=attention_bias, out_bias=attention_bias, scale_embeddings=True, norm_offset=1.0,
                      mlp="geglu", gelu_approximate="tanh")
    if architecture == STABLELM:  # LayerNorm with bias, optional q/k/v bias, partial rotary (above)
        fields.update(norm="layernorm", norm_eps=read_field(data, "layer_norm_eps", config_file, float, 1e-5),
                      qkv_bias=read_field(data, "use_qkv_bias", config_file, bool, False))
    if architecture == MIXTRAL:  # every FFN is a mixture of SwiGLU experts behind a top-k (renormalised) router
        fields.update(n_experts=read_field(data, "num_local_experts", config_file, int, 8),
                      experts_per_token=read_field(data, "num_experts_per_tok", config_file, int, 2), router="topk",
                      router_aux_loss_coef=read_field(data, "router_aux_loss_coef", config_file, float, 0.001),
                      router_z_loss_coef=0.0)
    window = read_field(data, "sliding_window", config_file, int, None)
    if architecture == QWEN2:
        sliding = "sliding_attention" in (data.get("layer_types") or []) or (
            read_field(data, "use_sliding_window", config_file, bool, False)
            and read_field(data, "max_window_layers", config_file, int, n_layers) < n_layers)
        window = window if sliding else None
    if architecture in (MISTRAL, QWEN2, PHI3, MIXTRAL) and window is not None:
        if window < max_seq_len:
            raise LlmkitError(
                f"{config_file}: sliding_window={window} is smaller than max_position_embeddings={max_seq_len}; "
                "llmkit does not implement sliding-window attention, so tokens further apart than the window "
                f"would attend differently. Set max_position_embeddings to {window} in config.json to use the "
                "model within its window, where full attention is exact"
            )
        fields["extra"] = {"sliding_window": window}  # a note: within max_seq_len full attention is exact
    return fields


def _gemma3_fields(data: dict[str, Any], config_file: Path, n_layers: int, max_seq_len: int) -> dict[str, Any]:
    """What Gemma 3 adds to Gemma: QK-norm, sandwich norms, local (sliding-window) and global layers with their own
    RoPE bases (rope_parameters per layer type, or the older rope_theta / rope_local_base_freq / rope_scaling; the
    scaling applies to global layers only), and 1/sqrt(query_pre_attn_scalar) as the attention scale."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if data.get(key) is not None:
            raise LlmkitError(f"{config_file}: {key}={data[key]!r}; llmkit's Gemma 3 has no logit soft-capping "
                              "(Gemma 3 checkpoints set it to null): this checkpoint cannot be imported")
    window = read_field(data, "sliding_window", config_file, int, 4096)
    pattern = read_field(data, "sliding_window_pattern", config_file, int, 6)
    hf_types = read_field(data, "layer_types", config_file, list, None) or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    unknown = sorted({kind for kind in hf_types if kind not in GEMMA3_LAYER_TYPES}, key=str)
    if unknown:
        raise LlmkitError(f"{config_file}: layer_types holds {unknown}; Gemma 3 layers are one of "
                          f"{list(GEMMA3_LAYER_TYPES)}: fix layer_types in the file")
    parameters = read_field(data, "rope_parameters", config_file, dict, {})
    full = read_field(parameters, "full_attention", config_file, dict, {}, where="rope_parameters")
    local = read_field(parameters, "sliding_attention", config_file, dict, {}, where="rope_parameters")
    global_rope = _rope_fields({"rope_parameters": full, "rope_scaling": data.get("rope_scaling"),
                                "rope_theta": data.get("rope_theta", 1_000_000.0)}, config_file, max_seq_len)
    local_rope = _rope_fields({"rope_parameters": local, "rope_theta": data.get("rope_local_base_freq", 10_000.0)},
                              config_file, max_seq_len)
    if local_rope["rope_scaling"] is not None:
        raise LlmkitError(f"{config_file}: rope_parameters.sliding_attention scales RoPE; llmkit's Gemma 3 scales only "
                          "the global layers' RoPE (as the released checkpoints do)")
    scalar = read_field(data, "query_pre_attn_scalar", config_file, float, 256.0)
    return dict(qk_norm=True, post_norms=True, sliding_window=window,
                layer_types=tuple(GEMMA3_LAYER_TYPES[kind] for kind in hf_types),
                rope_local_theta=local_rope["rope_theta"], attention_scale=scalar**-0.5, **global_rope)


def _rope_fields(data: dict[str, Any], config_file: Path, max_seq_len: int) -> dict[str, Any]:
    """rope_theta and scaling from transformers 5 `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    parameters = read_field(data, "rope_parameters", config_file, dict, {})
    scaling = read_field(data, "rope_scaling", config_file, dict, None) or parameters
    theta = read_field(parameters, "rope_theta", config_file, float, None, where="rope_parameters")
    theta = read_field(data, "rope_theta", config_file, float, 10000.0) if theta is None else theta
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LlmkitError(f"{config_file}: RoPE scaling type {kind!r} is not supported; llmkit supports "
                          f"{', '.join(ROPE_TYPES)}")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    factor = read_field(scaling, "factor", config_file, float, where="rope scaling")
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling=RopeScaling(kind="linear", factor=factor))
    field = lambda key, default, kind: read_field(scaling, key, config_file, kind, default, where="rope scaling")
    return dict(rope_theta=theta, rope_scaling=RopeScaling(
        kind="llama3", factor=factor, low_freq_factor=field("low_freq_factor", 1.0, float),
        high_freq_factor=field("high_freq_factor", 4.0, float),
        original_max_seq_len=field("original_max_position_embeddings", max_seq_len, int),
    ))


# --------------------------------------------------------------------------- Config -> config.json


def hf_architecture(config: Config) -> str:
    """The HF architecture `config` is written as: the one it was imported from when it still fits, else
    Mixtral for a mixture of experts, GPT-2 for learned positions, BLOOM for ALiBi, Gemma for its embedding scale,
    norm offset or GeGLU, StableLM for RoPE with LayerNorm, Phi-3 for partial rotary with RMSNorm, Qwen2 for q/k/v
    bias without output bias, Llama otherwise."""
    declared = config.hf_architecture
    if declared in MODEL_TYPES and _misfit(declared, config) is None:
        return declared
    if config.n_experts:
        candidate = MIXTRAL
    elif config.position == "learned":
        candidate = GPT2
    elif config.position == "alibi":
        candidate = BLOOM
    elif config.qk_norm or config.post_norms or config.local_layers:
        candidate = GEMMA3
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
        if architecture in (LLAMA, *GEMMAS) and config.qkv_bias != config.out_bias:
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
        if architecture in GEMMAS:
            wanted.update(mlp="geglu", gelu_approximate="tanh", mlp_bias=False, scale_embeddings=True, norm_offset=1.0)
        if architecture == GEMMA3:
            if config.sliding_window is None or config.rope_local_theta is None or config.attention_scale is None:
                return "sliding_window, rope_local_theta and attention_scale set"
            wanted.update(qk_norm=True, post_norms=True, sliding_window=config.sliding_window,
                          layer_types=config.layer_types or ("local",) * config.n_layers,
                          rope_local_theta=config.rope_local_theta, attention_scale=config.attention_scale)
    for field, value in {**FAMILY_ONLY_FIELDS, **wanted}.items():
        if getattr(config, field) != value:
            return f"{field}={value!r} (this config has {getattr(config, field)!r})"
    return None


def hf_config_dict(config: Config, architecture: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for `architecture` (legacy rope keys too, so 4.x loads it)."""
    eos: Any = config.eos_id
    if config.eos_ids and config.eos_ids[0] == eos:
        eos = list(config.eos_ids)
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
    if architecture == GEMMA3:
        layer_types = config.layer_types or ("local",) * config.n_layers
        local = dict(rope_type="default", rope_theta=config.rope_local_theta)
        fields.update(hidden_activation="gelu_pytorch_tanh", attention_bias=config.qkv_bias,
                      query_pre_attn_scalar=_whole(config.attention_scale**-2), sliding_window=config.sliding_window,
                      layer_types=[{"local": "sliding_attention", "global": "full_attention"}[t] for t in layer_types],
                      rope_local_base_freq=config.rope_local_theta, final_logit_softcapping=None,
                      attn_logit_softcapping=None,
                      rope_parameters={"full_attention": fields["rope_parameters"], "sliding_attention": local})
    return fields


def _whole(value: float) -> float | int:
    """An integer when `value` is one (within float rounding), since transformers types some fields as int."""
    return round(value) if abs(value - round(value)) < 1e-6 else value


def check_round_trip(config: Config, back: Config, architecture: str) -> None:
    """Refuse to export `config` when the config.json written for it reads back (through the importer) as `back`
    with any other value: that field is a variant `architecture` cannot express, which transformers would silently
    compute another way. Fields that only matter to a mixture of experts or to RoPE are compared when used."""
    unused = set(NOT_CARRIED) | (set(MOE_ONLY) if not config.n_experts else set()) | (
        set(ROPE_ONLY) if config.position != "rope" else set())
    for field in dataclasses.fields(Config):
        ours, theirs = getattr(config, field.name), getattr(back, field.name)
        if field.name not in unused and ours != theirs:
            raise LlmkitError(f"config {config.name!r} cannot be exported as {architecture}: its config.json has no "
                              f"way to say {field.name}={ours!r} (it would load back as {theirs!r}); change "
                              f"{field.name} or save the model in llmkit's native format (--to native)")
