"""Hugging Face peft adapter directories for IA3, prompt tuning and prefix tuning, in and out (peft 0.21's format):

    adapter_config.json         peft's config: peft_type, task_type CAUSAL_LM and the method's fields
    adapter_model.safetensors   IA3: base_model.model.<HF module>.ia3_l, (out, 1), or (1, in) for feed-forward layers
                                prompt tuning: prompt_embeddings (P, d_model)
                                prefix tuning: prompt_embeddings (P, n_layers * 2 * kv_dim), the folded prefix (peft
                                saves the reparameterisation MLP's output, never the MLP)

HF module names come from the architecture's key map in checkpoints/hf.py. Bottleneck adapters have no peft
equivalent: save them with llmkit.peft.core.save_adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmkit.checkpoints.hf import from_hf_state_dict, to_hf_state_dict
from llmkit.checkpoints.hf_config import GPT2, hf_architecture
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text
from llmkit.peft.adapters import BottleneckAdapter
from llmkit.peft.hf_peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, read_peft_config, read_peft_weights
from llmkit.peft.ia3 import IA3Settings, apply_ia3, ia3_layers
from llmkit.peft.prefix_tuning import PrefixTuningSettings, apply_prefix_tuning
from llmkit.peft.prompt_tuning import PromptTuningSettings, apply_prompt_tuning, require_plain_decoder

PEFT_VERSION = "0.21.2"  # the peft release whose files these are
PEFT_TYPE_KEY = "peft_type"
TASK_TYPE_KEY = "task_type"
CAUSAL_LM = "CAUSAL_LM"
IA3, PROMPT_TUNING, PREFIX_TUNING = "IA3", "PROMPT_TUNING", "PREFIX_TUNING"
IA3_SUFFIX = ".ia3_l"  # peft's IA3 vector, after the HF module name
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
MODEL_PREFIX = "base_model.model."  # peft's prefix before the HF model's own tensor names


# --------------------------------------------------------------------------- export


def export_peft_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's IA3 vectors, soft prompt or prefix as a peft adapter directory that
    `peft.PeftModel.from_pretrained(hf_model, directory)` loads; each file atomically."""
    has_ia3, soft_prompt, kv_prefix = bool(ia3_layers(model)), getattr(model, "soft_prompt", None), \
        getattr(model, "kv_prefix", None)
    if sum([has_ia3, soft_prompt is not None, kv_prefix is not None]) != 1:
        adapters = any(isinstance(module, BottleneckAdapter) for module in model.modules())
        raise LlmkitError("bottleneck adapters have no peft equivalent; save them with llmkit.peft.core.save_adapter"
                          if adapters else "the model needs exactly one of IA3, prompt tuning or prefix tuning applied "
                          "to export a peft adapter")
    config = model.config
    record: dict[str, Any] = dict(auto_mapping=None, base_model_name_or_path=base_model_name_or_path,
                                  inference_mode=True, modules_to_save=None, peft_version=PEFT_VERSION, revision=None,
                                  task_type=CAUSAL_LM)
    if has_ia3:
        record[PEFT_TYPE_KEY], fields, tensors = IA3, *_ia3_export(model)
    elif soft_prompt is not None:
        settings = soft_prompt.settings
        # peft refuses "TEXT" without a tokenizer path; the init does not matter once the weights are loaded
        text_init = settings.init == "text" and base_model_name_or_path is not None
        record[PEFT_TYPE_KEY] = PROMPT_TUNING
        fields = dict(num_attention_heads=config.n_heads, num_layers=config.n_layers, num_transformer_submodules=1,
                      num_virtual_tokens=soft_prompt.n_tokens, prompt_tuning_init="TEXT" if text_init else "RANDOM",
                      prompt_tuning_init_text=settings.init_text, token_dim=config.d_model, tokenizer_kwargs=None,
                      tokenizer_name_or_path=base_model_name_or_path if text_init else None)
        tensors = {PROMPT_EMBEDDINGS_KEY: soft_prompt.embedding.weight}
    else:
        settings = kv_prefix.settings
        record[PEFT_TYPE_KEY] = PREFIX_TUNING
        fields = dict(encoder_hidden_size=settings.hidden,  # unused by peft without prefix_projection
                      init_weights=None, num_attention_heads=config.n_kv_heads, num_layers=config.n_layers,
                      num_transformer_submodules=1, num_virtual_tokens=kv_prefix.n_tokens,
                      prefix_projection=settings.reparameterize, token_dim=config.kv_dim)
        with torch.no_grad():
            tensors = {PROMPT_EMBEDDINGS_KEY: kv_prefix.flat()}  # folded through the MLP when reparameterised
    record = dict(sorted({**record, **fields}.items()))  # peft writes its keys sorted
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    directory = Path(directory)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / PEFT_CONFIG_FILE, json.dumps(record, indent=2))
    return directory


def _ia3_export(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft's IA3 config fields and tensors: each vector as (out, 1), or (1, in) for a feed-forward layer."""
    config = model.config
    architecture = hf_architecture(config)
    layers = ia3_layers(model)
    state = {f"{name}{IA3_SUFFIX}": layer.ia3_scale.detach().reshape((1, -1) if layer.feedforward else (-1, 1))
             for name, layer in layers.items()}
    hf_state = to_hf_state_dict(config, state, architecture)
    if len(hf_state) != len(state):  # to_hf_state_dict joins only weights and biases of fused projections
        raise LlmkitError(f"a {architecture} checkpoint fuses some of the IA3 targets {sorted(_targets(layers))} with "
                          "other projections, so peft cannot hold llmkit's separate vectors; target unfused linears "
                          "(e.g. the MLP's down_proj) to export to peft")
    targets = {hf_name.removesuffix(IA3_SUFFIX).rsplit(".", 1)[-1]: tensor.shape[0] == 1
               for hf_name, tensor in hf_state.items()}  # HF module suffix -> is it a feed-forward layer
    fields = dict(exclude_modules=None, fan_in_fan_out=architecture == GPT2,
                  feedforward_modules=[name for name, feedforward in targets.items() if feedforward],
                  init_ia3_weights=True, target_modules=list(targets))
    return fields, {f"{MODEL_PREFIX}{name}": tensor for name, tensor in hf_state.items()}


def _targets(layers: dict[str, nn.Module]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in layers}


# --------------------------------------------------------------------------- import


def import_peft_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the IA3, prompt-tuning or prefix-tuning adapter of a peft directory to a base llmkit model (the
    one the adapter was trained on), in place; returns the model."""
    config_file, weights_file, record = read_peft_config(Path(directory))
    peft_type, task_type = record.get(PEFT_TYPE_KEY), record.get(TASK_TYPE_KEY)
    if peft_type not in (IA3, PROMPT_TUNING, PREFIX_TUNING):
        raise LlmkitError(f"{config_file} has peft_type {peft_type!r}; this importer reads {IA3}, {PROMPT_TUNING} and "
                          f"{PREFIX_TUNING} adapters (LORA: use llmkit.peft.hf_peft.import_peft_lora)")
    if task_type not in (CAUSAL_LM, None):
        raise LlmkitError(f"{config_file} has task_type {task_type!r}; llmkit's decoder takes {CAUSAL_LM} adapters, "
                          "train the adapter for causal language modelling")
    tensors = read_peft_weights(Path(directory))
    if peft_type == IA3:
        return _import_ia3(model, tensors, weights_file)
    require_plain_decoder(model, peft_type.lower().replace("_", " "))
    config = model.config
    if record.get("num_transformer_submodules", 1) != 1 or record.get("num_layers") != config.n_layers:
        raise LlmkitError(f"{config_file} is for a model with {record.get('num_layers')} layers "
                          f"(num_transformer_submodules={record.get('num_transformer_submodules')}); this decoder has "
                          f"{config.n_layers}: load the adapter onto the base model it was trained on")
    n_virtual = record.get("num_virtual_tokens")
    width = config.d_model if peft_type == PROMPT_TUNING else config.n_layers * 2 * config.kv_dim
    embeddings = tensors.get(PROMPT_EMBEDDINGS_KEY)
    if embeddings is None or tuple(embeddings.shape) != (n_virtual, width):
        found = "no such tensor" if embeddings is None else f"shape {tuple(embeddings.shape)}"
        raise LlmkitError(f"{weights_file} should hold {PROMPT_EMBEDDINGS_KEY} of shape ({n_virtual}, {width}) for "
                          f"this model, found {found}; load the adapter onto the base model it was trained on")
    if peft_type == PROMPT_TUNING:
        apply_prompt_tuning(model, PromptTuningSettings(n_virtual_tokens=n_virtual))
        target = model.soft_prompt.embedding.weight
    else:
        hidden = record.get("encoder_hidden_size") or PrefixTuningSettings.hidden
        apply_prefix_tuning(model, PrefixTuningSettings(n_virtual_tokens=n_virtual, reparameterize=False, hidden=hidden))
        target = model.kv_prefix.embedding.weight
    with torch.no_grad():
        target.copy_(embeddings)
    return model


def _import_ia3(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """Map peft's IA3 vectors to llmkit module names, apply IA3 to exactly those modules, copy the values in."""
    config = model.config
    architecture = hf_architecture(config)
    hf_state = {}
    for key, tensor in tensors.items():
        if not (key.startswith(MODEL_PREFIX) and key.endswith(IA3_SUFFIX)):
            raise LlmkitError(f"{source} holds {key}, not an IA3 vector ({MODEL_PREFIX}<module>{IA3_SUFFIX}); "
                              "export the adapter again with peft")
        hf_state[key.removeprefix(MODEL_PREFIX)] = tensor
    try:
        state = from_hf_state_dict(config, hf_state, architecture)
    except KeyError as error:
        raise LlmkitError(f"{source}: module {error.args[0]} is not part of a {architecture} model with "
                          f"{config.n_layers} layers; load the adapter onto the base model it was trained on") from None
    if len(state) != len(hf_state):
        raise LlmkitError(f"{source} scales a fused {architecture} projection, which llmkit keeps as separate linears; "
                          "train the IA3 adapter on unfused target modules")
    vectors = {name.removesuffix(IA3_SUFFIX): tensor for name, tensor in state.items()}  # llmkit module -> vector
    settings = IA3Settings(targets=tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in vectors)),
                           feedforward=tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, tensor in vectors.items()
                                                           if tensor.shape[0] == 1 and tensor.shape[1] > 1)))
    covered = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in settings.targets}
    if covered != set(vectors):
        missing = sorted(covered - set(vectors))
        raise LlmkitError(f"{source} scales {len(vectors)} modules, but llmkit's IA3 scales every module named "
                          f"{list(settings.targets)} ({len(covered)}; e.g. {missing[:2]} has no vector): an adapter "
                          "that skips layers cannot be imported")
    for name, vector in vectors.items():
        module = model.get_submodule(name)
        size = getattr(module, "in_features" if name.rsplit(".", 1)[-1] in settings.feedforward else "out_features", None)
        if vector.numel() != size:
            raise LlmkitError(f"{source}: the vector of {name} has {vector.numel()} entries, the model's layer needs "
                              f"{size}; load the adapter onto the base model it was trained on")
    apply_ia3(model, settings)
    layers = ia3_layers(model)
    with torch.no_grad():
        for name, vector in vectors.items():
            layers[name].ia3_scale.copy_(vector.reshape(-1))
    return model
