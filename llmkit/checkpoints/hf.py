"""Hugging Face safetensors directories in and out: GPT-2, Llama, Mistral and Qwen2.

Each family has one explicit key map between Hugging Face tensor names and llmkit's, chosen by
the architecture the checkpoint's config.json declares (never guessed from the tensor names).
Weights are read with `safetensors` only; pickled `pytorch_model.bin` files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmkit.config import Config, RopeScaling
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text
from llmkit.models.decoder import Decoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
INDEX_WEIGHT_MAP_KEY = "weight_map"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
MISTRAL = "MistralForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2"}
ARCHITECTURE_KEY = "hf_architecture"  # Config.extra key: the family a checkpoint came from, written back on export

# HF module name -> llmkit module name; "{i}" is the layer index. Parameter suffixes (.weight/.bias) carry over.
LLAMA_MODULES = {
    "model.embed_tokens": "embed",
    "model.layers.{i}.input_layernorm": "blocks.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "blocks.{i}.attn.q_proj",
    "model.layers.{i}.self_attn.k_proj": "blocks.{i}.attn.k_proj",
    "model.layers.{i}.self_attn.v_proj": "blocks.{i}.attn.v_proj",
    "model.layers.{i}.self_attn.o_proj": "blocks.{i}.attn.o_proj",
    "model.layers.{i}.post_attention_layernorm": "blocks.{i}.mlp_norm",
    "model.layers.{i}.mlp.gate_proj": "blocks.{i}.mlp.gate_proj",
    "model.layers.{i}.mlp.up_proj": "blocks.{i}.mlp.up_proj",
    "model.layers.{i}.mlp.down_proj": "blocks.{i}.mlp.down_proj",
    "model.norm": "final_norm",
    "lm_head": "lm_head",
}
GPT2_MODULES = {
    "transformer.wte": "embed",
    "transformer.wpe": "pos_embed",
    "transformer.h.{i}.ln_1": "blocks.{i}.attn_norm",
    # transformer.h.{i}.attn.c_attn holds q, k and v side by side (see GPT2_FUSED_QKV)
    "transformer.h.{i}.attn.c_proj": "blocks.{i}.attn.o_proj",
    "transformer.h.{i}.ln_2": "blocks.{i}.mlp_norm",
    "transformer.h.{i}.mlp.c_fc": "blocks.{i}.mlp.up_proj",
    "transformer.h.{i}.mlp.c_proj": "blocks.{i}.mlp.down_proj",
    "transformer.ln_f": "final_norm",
    "lm_head": "lm_head",
}
GPT2_PREFIX = "transformer."  # checkpoints saved from GPT2Model (openai-community/gpt2) lack it
GPT2_FUSED_QKV = "transformer.h.{i}.attn.c_attn"
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D stores weights (in, out)
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# Non-persistent buffers some exporters saved anyway (causal masks, rotary tables): not weights.
ROTARY_BUFFER = (".rotary_emb.inv_freq",)
BUFFER_SUFFIXES = {GPT2: (".attn.bias", ".attn.masked_bias"), LLAMA: ROTARY_BUFFER, MISTRAL: ROTARY_BUFFER,
                   QWEN2: ROTARY_BUFFER}
ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------- config.json -> Config


def config_from_hf(path: str | Path) -> Config:
    """A `Config` from a Hugging Face config.json (the file, or the directory holding it)."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    data = _read_json(config_file)
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LlmkitError(f"{path} is not valid JSON ({error}); re-download or re-export the model") from None
    if not isinstance(data, dict):
        raise LlmkitError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download or re-export it")
    return data


# --------------------------------------------------------------------------- key maps (both directions)


def _module_map(architecture: str, n_layers: int) -> dict[str, str]:
    """HF module name -> llmkit module name for every layer of this model."""
    table = GPT2_MODULES if architecture == GPT2 else LLAMA_MODULES
    modules = {}
    for hf_name, name in table.items():
        for i in range(n_layers) if "{i}" in hf_name else [None]:
            modules[hf_name.format(i=i)] = name.format(i=i)
    return modules


def to_hf_state_dict(config: Config, state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 fuse and transpose) llmkit tensors into `architecture`'s HF names."""
    to_hf = {name: hf_name for hf_name, name in _module_map(architecture, config.n_layers).items()}
    hf_state = {}
    for name, tensor in state.items():
        module, parameter = name.rsplit(".", 1)
        if architecture == GPT2 and module.endswith(("attn.q_proj", "attn.k_proj", "attn.v_proj")):
            continue  # fused into c_attn below
        if module not in to_hf:
            raise LlmkitError(f"parameter {name} has no place in a {architecture} checkpoint; merge or remove "
                              "adapters and other added modules before exporting")
        hf_name = to_hf[module]
        if architecture == GPT2 and parameter == "weight" and hf_name.endswith(GPT2_CONV1D):
            tensor = tensor.t()  # (out, in) -> Conv1D (in, out)
        hf_state[f"{hf_name}.{parameter}"] = tensor
    if architecture == GPT2:
        for i in range(config.n_layers):
            fused = GPT2_FUSED_QKV.format(i=i)
            q, k, v = (state[f"blocks.{i}.attn.{p}_proj.weight"] for p in "qkv")
            hf_state[f"{fused}.weight"] = torch.cat((q, k, v), dim=0).t()  # (3C, C) -> (C, 3C)
            hf_state[f"{fused}.bias"] = torch.cat([state[f"blocks.{i}.attn.{p}_proj.bias"] for p in "qkv"])
    return hf_state


def from_hf_state_dict(config: Config, hf_state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: HF-named tensors (already checked) -> llmkit names."""
    modules = _module_map(architecture, config.n_layers)
    fused = {GPT2_FUSED_QKV.format(i=i): i for i in range(config.n_layers)} if architecture == GPT2 else {}
    state = {}
    for hf_name, tensor in hf_state.items():
        module, parameter = hf_name.rsplit(".", 1)
        if architecture == GPT2 and parameter == "weight" and module.endswith(GPT2_CONV1D):
            tensor = tensor.t()  # Conv1D (in, out) -> (out, in)
        if module in fused:
            parts = tensor.split([config.q_dim, config.kv_dim, config.kv_dim], dim=0)  # (3C, ...) -> 3 x (C, ...)
            for projection, part in zip("qkv", parts):
                state[f"blocks.{fused[module]}.attn.{projection}_proj.{parameter}"] = part.contiguous()
        else:
            state[f"{modules[module]}.{parameter}"] = tensor.contiguous()
    return state


def _expected_state(config: Config) -> dict[str, torch.Tensor]:
    """llmkit's parameter names and shapes for `config`, as meta tensors (no memory)."""
    with torch.device("meta"):
        return Decoder(config).state_dict()


# --------------------------------------------------------------------------- load


def load_hf(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict from a Hugging Face directory (config.json + safetensors weights)."""
    directory = Path(path)
    if not directory.exists():
        raise LlmkitError(f"model directory {directory} does not exist; pass the folder that holds config.json and "
                          f"{WEIGHTS_FILE}")
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is a file; pass the Hugging Face model directory that holds it")
    config = config_from_hf(directory)
    architecture = config.extra[ARCHITECTURE_KEY]
    locations, weight_map = _tensor_locations(directory)  # HF tensor name -> file holding it; the index's map
    expected = {name: tuple(t.shape) for name, t in
                to_hf_state_dict(config, _expected_state(config), architecture).items()}
    where = {}  # expected HF name -> (file, name inside the file)
    for stored, file in locations.items():
        name = stored
        if architecture == GPT2 and not name.startswith(GPT2_PREFIX) and not name.startswith("lm_head."):
            name = GPT2_PREFIX + name
        if name.endswith(BUFFER_SUFFIXES[architecture]):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the head is the embedding; some exporters write a copy
        if name not in expected:
            raise LlmkitError(f"unexpected tensor {stored} in {file}: a {architecture} model with this config.json "
                              f"({config.n_layers} layers) has no such weight; the weights and config.json disagree, "
                              "use the config.json that came with these weights")
        where[name] = (file, stored)
    missing = [name for name in expected if name not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        # the shard the index says holds it; else the index (sharded) or the single weights file
        file = directory / (weight_map.get(missing[0]) or (WEIGHTS_INDEX_FILE if weight_map else WEIGHTS_FILE))
        raise LlmkitError(f"tensor {missing[0]}{more} missing from {file}; the checkpoint is incomplete "
                          "(an interrupted download or export): re-download or re-export it")
    hf_state = {}
    for file in dict.fromkeys(file for file, _ in where.values()):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name, (_, stored) in ((n, w) for n, w in where.items() if w[0] == file):
                    shape = tuple(handle.get_slice(stored).get_shape())
                    if shape != expected[name]:
                        raise LlmkitError(f"tensor {stored} has shape {shape} in {file}, config expects "
                                          f"{expected[name]}; config.json does not describe these weights, use the "
                                          "one that came with them")
                    hf_state[name] = handle.get_tensor(stored)
        except (SafetensorError, OSError) as error:
            raise LlmkitError(f"{file} cannot be read ({error}); it is truncated or corrupt: re-download or "
                              "re-export it") from None
    return config, from_hf_state_dict(config, hf_state, architecture)


def _tensor_locations(directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every tensor name in the directory's safetensors file(s) with the file it is in, and the shard
    index's weight map (empty for a single file)."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    weight_map: dict[str, str] = {}
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get(INDEX_WEIGHT_MAP_KEY)
        if not isinstance(weight_map, dict):
            raise LlmkitError(f"{index} has no {INDEX_WEIGHT_MAP_KEY!r} object; re-download or re-export the model")
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
        for shard in files:
            if not shard.is_file():
                raise LlmkitError(f"shard {shard} listed in {index} is missing; re-download the checkpoint")
    elif any((directory / name).exists() for name in PICKLE_FILES):
        raise LlmkitError(
            f"{directory} holds only pickled PyTorch weights ({' / '.join(PICKLE_FILES)}); llmkit never unpickles "
            f"files (loading a pickle can run arbitrary code). Convert them to {WEIGHTS_FILE} with a tool you trust "
            "(for example transformers' save_pretrained) and load that directory"
        )
    else:
        raise LlmkitError(f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; the model directory is "
                          "incomplete: re-download or re-export it")
    locations = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                locations.update(dict.fromkeys(handle.keys(), file))
        except (SafetensorError, OSError) as error:
            raise LlmkitError(f"{file} is not a readable safetensors file ({error}); it is truncated or corrupt: "
                              "re-download or re-export it") from None
    return locations, weight_map


# --------------------------------------------------------------------------- export


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


def export_hf(
    model: nn.Module | tuple[Config, dict[str, torch.Tensor]], out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors, each atomically) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads; `tokenizer.save(out_dir)` when given."""
    config, state = (model.config, model.state_dict()) if isinstance(model, nn.Module) else model
    architecture = hf_architecture(config)
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise LlmkitError(f"tokenizer of type {type(tokenizer).__name__} has no save(directory) method; pass an "
                          "llmkit Tokenizer")
    expected = _expected_state(config)
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected:
            problem = "is missing" if name not in state else "is not a parameter of this config's decoder"
            raise LlmkitError(f"cannot export: tensor {name} {problem}; pass a Decoder built from this config "
                              "(merge or remove adapters first)")
        if state[name].shape != expected[name].shape:
            raise LlmkitError(f"cannot export: tensor {name} has shape {tuple(state[name].shape)}, config "
                              f"{config.name!r} expects {tuple(expected[name].shape)}")
    tensors = _unshared({name: tensor.detach().cpu().contiguous()
                         for name, tensor in to_hf_state_dict(config, state, architecture).items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    dtype = next(iter(tensors.values())).dtype
    atomic_write_text(out / CONFIG_FILE, json.dumps(hf_config_dict(config, architecture, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share memory with an earlier one: safetensors writes each storage once."""
    seen: set[int] = set()
    owned = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        owned[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return owned
