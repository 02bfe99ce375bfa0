"""Hugging Face safetensors directories in and out: GPT-2, Llama, Mistral, Qwen2, BLOOM, Phi-3, Gemma, Gemma 3, StableLM
decoders here; `export_hf` writes every family (BERT encoders through hf_bert.py, T5 through hf_t5.py).

Each family has one explicit key map between Hugging Face tensor names and llmkit's, chosen by
the architecture the checkpoint's config.json declares (never guessed from the tensor names).
Weights are read with `safetensors` only; pickled `pytorch_model.bin` files are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmkit.checkpoints.hf_bert import bert_config_dict, to_hf_bert_state_dict
from llmkit.checkpoints.hf_config import (
    BLOOM,
    GEMMA,
    GEMMA3,
    GPT2,
    LLAMA,
    MISTRAL,
    MIXTRAL,
    PHI3,
    QWEN2,
    STABLELM,
    config_from_hf,
    hf_architecture,
    hf_config_dict,
)
from llmkit.checkpoints.hf_files import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, check_tokenizer, tensor_locations, write_hf_dir
from llmkit.checkpoints.hf_t5 import t5_config_dict, to_hf_t5_state_dict
from llmkit.checkpoints.hf_whisper import to_hf_whisper_state_dict, whisper_config_dict
from llmkit.checkpoints.native import saved_config
from llmkit.config import Config
from llmkit.errors import LlmkitError

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
BLOOM_MODULES = {
    "transformer.word_embeddings": "embed",
    "transformer.word_embeddings_layernorm": "embed_norm",
    "transformer.h.{i}.input_layernorm": "blocks.{i}.attn_norm",
    # transformer.h.{i}.self_attention.query_key_value holds q, k and v per head (see FUSED)
    "transformer.h.{i}.self_attention.dense": "blocks.{i}.attn.o_proj",
    "transformer.h.{i}.post_attention_layernorm": "blocks.{i}.mlp_norm",
    "transformer.h.{i}.mlp.dense_h_to_4h": "blocks.{i}.mlp.up_proj",
    "transformer.h.{i}.mlp.dense_4h_to_h": "blocks.{i}.mlp.down_proj",
    "transformer.ln_f": "final_norm",
    "lm_head": "lm_head",
}
# Phi-3 is Llama with q, k, v in one qkv_proj and gate, up in one gate_up_proj (see FUSED)
PHI3_MODULES = {hf_name: name for hf_name, name in LLAMA_MODULES.items()
                if not hf_name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
# Mixtral is Llama with a mixture of SwiGLU experts (w1 = gate, w3 = up, w2 = down; "{j}" is the expert) and a router
MIXTRAL_MODULES = {
    **{hf_name: name for hf_name, name in LLAMA_MODULES.items() if ".mlp." not in hf_name},
    "model.layers.{i}.block_sparse_moe.gate": "blocks.{i}.mlp.router",
    "model.layers.{i}.block_sparse_moe.experts.{j}.w1": "blocks.{i}.mlp.experts.{j}.gate_proj",
    "model.layers.{i}.block_sparse_moe.experts.{j}.w3": "blocks.{i}.mlp.experts.{j}.up_proj",
    "model.layers.{i}.block_sparse_moe.experts.{j}.w2": "blocks.{i}.mlp.experts.{j}.down_proj",
}
# Gemma 3 is Llama with QK-norm and a norm on each side of both sublayers; note its post_attention_layernorm is the
# attention output's norm, and pre_feedforward_layernorm the MLP's input norm (Llama's post_attention_layernorm)
GEMMA3_MODULES = {
    **{hf_name: name for hf_name, name in LLAMA_MODULES.items() if "post_attention_layernorm" not in hf_name},
    "model.layers.{i}.self_attn.q_norm": "blocks.{i}.attn.q_norm",
    "model.layers.{i}.self_attn.k_norm": "blocks.{i}.attn.k_norm",
    "model.layers.{i}.post_attention_layernorm": "blocks.{i}.post_attn_norm",
    "model.layers.{i}.pre_feedforward_layernorm": "blocks.{i}.mlp_norm",
    "model.layers.{i}.post_feedforward_layernorm": "blocks.{i}.post_mlp_norm",
}
MODULES = {GPT2: GPT2_MODULES, BLOOM: BLOOM_MODULES, PHI3: PHI3_MODULES, MIXTRAL: MIXTRAL_MODULES,
           GEMMA3: GEMMA3_MODULES}  # else Llama's
# Fused HF linears: HF module -> the llmkit modules whose output rows it holds, in order.
QKV = ("blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj")
FUSED = {
    GPT2: {"transformer.h.{i}.attn.c_attn": QKV},
    BLOOM: {"transformer.h.{i}.self_attention.query_key_value": QKV},
    PHI3: {"model.layers.{i}.self_attn.qkv_proj": QKV,
           "model.layers.{i}.mlp.gate_up_proj": ("blocks.{i}.mlp.gate_proj", "blocks.{i}.mlp.up_proj")},
}
INTERLEAVED_PER_HEAD = (BLOOM,)  # rows are [q_h; k_h; v_h] for each head h, not [q; k; v]
# Checkpoints saved from the base model (openai-community/gpt2, bigscience/bloom-560m) lack the prefix
BASE_PREFIX = {GPT2: "transformer.", BLOOM: "transformer."}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D stores weights (in, out)
# Non-persistent buffers some exporters saved anyway (causal masks, rotary tables): not weights.
ROTARY_BUFFER = (".rotary_emb.inv_freq",)
BUFFER_SUFFIXES = {GPT2: (".attn.bias", ".attn.masked_bias"), LLAMA: ROTARY_BUFFER, MISTRAL: ROTARY_BUFFER,
                   QWEN2: ROTARY_BUFFER, BLOOM: (), PHI3: ROTARY_BUFFER, GEMMA: ROTARY_BUFFER, GEMMA3: ROTARY_BUFFER,
                   MIXTRAL: ROTARY_BUFFER,
                   STABLELM: ROTARY_BUFFER}


# --------------------------------------------------------------------------- key maps (both directions)


def _module_map(architecture: str, n_layers: int, n_experts: int = 0) -> dict[str, str]:
    """HF module name -> llmkit module name for every layer (and expert) of this model."""
    modules = {}
    for hf_name, name in MODULES.get(architecture, LLAMA_MODULES).items():
        for i in range(n_layers) if "{i}" in hf_name else [None]:
            for j in range(n_experts) if "{j}" in hf_name else [None]:
                modules[hf_name.format(i=i, j=j)] = name.format(i=i, j=j)
    return modules


def _fused_map(architecture: str, n_layers: int) -> dict[str, tuple[str, ...]]:
    """Fused HF module name -> the llmkit modules it holds, for every layer of this model."""
    return {hf_name.format(i=i): tuple(part.format(i=i) for part in parts)
            for hf_name, parts in FUSED.get(architecture, {}).items() for i in range(n_layers)}


def _rows(config: Config, module: str) -> int:
    """Output rows of an llmkit projection that HF may fuse with others."""
    if module.endswith("q_proj"):
        return config.q_dim
    return config.kv_dim if module.endswith(("k_proj", "v_proj")) else config.d_ff


def _join(config: Config, architecture: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack the parts' rows into one fused tensor: [q; k; v] (or per head [q_h; k_h; v_h] for BLOOM)."""
    if architecture in INTERLEAVED_PER_HEAD:
        per_head = [part.reshape(config.n_heads, config.head_dim, *part.shape[1:]) for part in parts]  # (H, D, ...)
        return torch.stack(per_head, dim=1).reshape(-1, *parts[0].shape[1:])  # (H, 3, D, ...) -> (3HD, ...)
    return torch.cat(parts, dim=0)


def _split(config: Config, architecture: str, modules: tuple[str, ...], tensor: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `_join`: one fused tensor -> one tensor per llmkit module."""
    if architecture in INTERLEAVED_PER_HEAD:
        per_head = tensor.reshape(config.n_heads, len(modules), config.head_dim, *tensor.shape[1:])  # (H, 3, D, ...)
        return [per_head[:, j].reshape(-1, *tensor.shape[1:]) for j in range(len(modules))]  # 3 x (HD, ...)
    return list(tensor.split([_rows(config, module) for module in modules], dim=0))


def to_hf_state_dict(config: Config, state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Rename (and where HF fuses or transposes, fuse and transpose) llmkit tensors into `architecture`'s HF names."""
    to_hf = {name: hf_name for hf_name, name in _module_map(architecture, config.n_layers, config.n_experts).items()}
    fused = _fused_map(architecture, config.n_layers)
    in_fused = {module for modules in fused.values() for module in modules}
    hf_state = {}
    for name, tensor in state.items():
        module, parameter = name.rsplit(".", 1)
        if module in in_fused:
            continue  # joined below
        if module not in to_hf:
            raise LlmkitError(f"parameter {name} has no place in a {architecture} checkpoint; merge or remove "
                              "adapters and other added modules before exporting")
        hf_state[f"{to_hf[module]}.{parameter}"] = tensor
    for hf_name, modules in fused.items():
        for parameter in ("weight", "bias"):
            if f"{modules[0]}.{parameter}" in state:
                parts = [state[f"{module}.{parameter}"] for module in modules]
                hf_state[f"{hf_name}.{parameter}"] = _join(config, architecture, parts)
    if architecture == GPT2:
        for hf_name, tensor in hf_state.items():
            if hf_name.endswith(tuple(f"{module}.weight" for module in GPT2_CONV1D)):
                hf_state[hf_name] = tensor.t()  # (out, in) -> Conv1D (in, out)
    return hf_state


def from_hf_state_dict(config: Config, hf_state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: HF-named tensors (already checked) -> llmkit names."""
    modules = _module_map(architecture, config.n_layers, config.n_experts)
    fused = _fused_map(architecture, config.n_layers)
    state = {}
    for hf_name, tensor in hf_state.items():
        module, parameter = hf_name.rsplit(".", 1)
        if architecture == GPT2 and parameter == "weight" and module.endswith(GPT2_CONV1D):
            tensor = tensor.t()  # Conv1D (in, out) -> (out, in)
        if module in fused:
            for part, piece in zip(fused[module], _split(config, architecture, fused[module], tensor)):
                state[f"{part}.{parameter}"] = piece.contiguous()
        else:
            state[f"{modules[module]}.{parameter}"] = tensor.contiguous()
    return state


def _expected_state(config: Config) -> dict[str, torch.Tensor]:
    """llmkit's parameter names and shapes for `config` (a decoder, an encoder with its head, or a seq2seq), as meta
    tensors (no memory)."""
    from llmkit.checkpoints import network_for

    with torch.device("meta"):
        return network_for(config).state_dict()


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
    architecture = config.hf_architecture
    locations, weight_map = tensor_locations(directory)  # HF tensor name -> file holding it; the index's map
    expected = {name: tuple(t.shape) for name, t in
                to_hf_state_dict(config, _expected_state(config), architecture).items()}
    where = {}  # expected HF name -> (file, name inside the file)
    for stored, file in locations.items():
        name = stored
        prefix = BASE_PREFIX.get(architecture)
        if prefix and not name.startswith(prefix) and not name.startswith("lm_head."):
            name = prefix + name
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


# --------------------------------------------------------------------------- export


# --------------------------------------------------------------------------- export


def export_hf(
    model: nn.Module | tuple[Config, dict[str, torch.Tensor]], out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors, each atomically; `tokenizer.save(out_dir)`
    when given) that transformers loads, for every family: a decoder as its causal-LM class
    (`AutoModelForCausalLM`), a BERT encoder as BertModel / BertForMaskedLM / BertFor{Sequence,Token}Classification
    (the head the model carries), a seq2seq model as T5ForConditionalGeneration, a speech model as
    WhisperForConditionalGeneration, a ViT as ViTModel / ViTForImageClassification, a CLIP as CLIPModel. Importing
    the result gives back the
    same config and tensors; a config the family's config.json cannot express is refused before anything is written."""
    config, state = (saved_config(model), model.state_dict()) if isinstance(model, nn.Module) else model
    if isinstance(config, Config) and config.recurrent_layers:  # a ClipConfig holds two attention towers
        raise LlmkitError(f"{config.name} has {config.layer_mixers[config.recurrent_layers[0]]} layers, which no "
                          "Hugging Face decoder class holds; save it in llmkit's own format (a checkpoint directory)")
    check_tokenizer(tokenizer)
    _check_exported_state(config, state)
    hf_config, tensors = _hf_files(config, state)
    return write_hf_dir(out_dir, hf_config, tensors, tokenizer)


def _hf_files(config: Config, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json contents and HF-named tensors of the family `config.arch` names."""
    dtype = next(iter(state.values())).dtype
    if config.arch == "clip":
        from llmkit.checkpoints.hf_clip import clip_config_dict, to_hf_clip_state_dict

        return clip_config_dict(config, dtype), to_hf_clip_state_dict(config, state)
    if config.arch == "vision":
        from llmkit.checkpoints.hf_vit import to_hf_vit_state_dict, vit_config_dict

        return vit_config_dict(config, dtype), to_hf_vit_state_dict(config, state)
    if config.arch == "encoder":
        return bert_config_dict(config, dtype), to_hf_bert_state_dict(config, state)
    if config.arch == "seq2seq":
        return t5_config_dict(config, dtype), to_hf_t5_state_dict(config, state)
    if config.arch == "speech":
        return whisper_config_dict(config, dtype), to_hf_whisper_state_dict(config, state)
    architecture = hf_architecture(config)
    return hf_config_dict(config, architecture, dtype), to_hf_state_dict(config, state, architecture)


def _check_exported_state(config: Config, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the network `config` describes, none other, each of its shape."""
    expected = _expected_state(config)
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected:
            problem = "is missing" if name not in state else f"is not a parameter of this config's {config.arch}"
            raise LlmkitError(f"cannot export: tensor {name} {problem}; pass a model built from this config "
                              "(merge or remove adapters first)")
        if state[name].shape != expected[name].shape:
            raise LlmkitError(f"cannot export: tensor {name} has shape {tuple(state[name].shape)}, config "
                              f"{config.name!r} expects {tuple(expected[name].shape)}")
