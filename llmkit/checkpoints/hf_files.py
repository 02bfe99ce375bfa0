"""The files of a Hugging Face model directory, shared by every family's importer and exporter: where each tensor
is (one model.safetensors or shards listed in model.safetensors.index.json; pickles refused), and writing
config.json + model.safetensors (+ tokenizer files) atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmkit.checkpoints.hf_config import CONFIG_FILE
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
INDEX_WEIGHT_MAP_KEY = "weight_map"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def tensor_locations(directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every tensor name in the directory's safetensors file(s) with the file it is in, and the shard
    index's weight map (empty for a single file)."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    weight_map: dict[str, str] = {}
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json_object(index).get(INDEX_WEIGHT_MAP_KEY)
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


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse, before anything is written, a tokenizer that cannot save itself next to the weights."""
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise LlmkitError(f"tokenizer of type {type(tokenizer).__name__} has no save(directory) method; pass an "
                          "llmkit Tokenizer")


def write_hf_dir(out_dir: str | Path, hf_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 tokenizer: Any = None) -> Path:
    """Write `tensors` (already HF-named) as model.safetensors and `hf_config` as config.json, each atomically,
    then `tokenizer.save(out_dir)` when given."""
    check_tokenizer(tokenizer)
    owned = _unshared({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(owned, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
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


def read_mapped_tensors(
    directory: Path, names: dict[str, str], skip: Callable[[str], bool], architecture: str | None,
    rename: Callable[[str], str] = lambda stored: stored,
) -> dict[str, torch.Tensor]:
    """llmkit-named tensors of a HF directory's safetensors file(s) through the key map `names` (HF -> llmkit);
    `rename(stored)` is the HF name a stored tensor goes by (a prefix some checkpoints add removed), and `skip(name)`
    marks tensors llmkit does not load. An unknown or missing tensor is an error."""
    locations, _ = tensor_locations(directory)  # refuses pickled weights, follows a shard index
    wanted = [stored for stored in locations if not skip(rename(stored))]
    for stored in wanted:
        if rename(stored) not in names:
            raise LlmkitError(f"unexpected tensor {stored} in {locations[stored]}: a {architecture} with this "
                              "config.json has no such weight; use the config.json that came with these weights")
    state = {names[rename(stored)]: tensor for stored, tensor in read_tensors(locations, wanted).items()}
    absent = sorted(hf for hf, name in names.items() if name not in state)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise LlmkitError(f"tensor {absent[0]}{more} is missing from {directory}; the checkpoint is incomplete: "
                          "re-download or re-export it")
    return state


def read_tensors(locations: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` (HF names) from the safetensors files `locations` says hold them (`tensor_locations`)."""
    tensors = {}
    for file in dict.fromkeys(locations[name] for name in names):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in (n for n in names if locations[n] == file):
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise LlmkitError(f"{file} cannot be read ({error}); it is truncated or corrupt: re-download or "
                              "re-export it") from None
    return tensors


def layer_module_map(modules: dict[str, str], encoder_prefix: str, n_layers: int,
                     n_decoder_layers: int) -> dict[str, str]:
    """HF module name -> llmkit module name of an encoder-decoder, from a table whose per-layer entries hold `{i}`:
    modules under `encoder_prefix` repeat n_layers times, the others n_decoder_layers times."""
    mapped = {}
    for hf_name, name in modules.items():
        count = n_layers if hf_name.startswith(encoder_prefix) else n_decoder_layers
        for i in range(count) if "{i}" in hf_name else [None]:
            mapped[hf_name.format(i=i)] = name.format(i=i)
    return mapped


def module_state(tensors: dict[str, torch.Tensor], modules: dict[str, str], expected: dict[str, torch.Tensor],
                 locations: dict[str, Path], model: str, renamed: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """HF tensors renamed to llmkit's through the module map (`renamed`: whole tensor names mapped directly),
    each checked against `expected` (a meta model's state dict): an unknown name or a wrong shape is an error that
    names `model` (e.g. "a T5 model with this config.json (6+6 layers)")."""
    state = {}
    for hf_name, tensor in tensors.items():
        module, parameter = hf_name.rsplit(".", 1)
        name = (renamed or {}).get(hf_name) or (f"{modules[module]}.{parameter}" if module in modules else None)
        if name not in expected:
            raise LlmkitError(f"unexpected tensor {hf_name} in {locations[hf_name]}: {model} has no such weight; use "
                              "the config.json that came with these weights")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmkitError(f"tensor {hf_name} has shape {tuple(tensor.shape)} in {locations[hf_name]}, config "
                              f"expects {tuple(expected[name].shape)}; config.json does not describe these weights")
        state[name] = tensor
    return state
